//! End-to-end test of `tls = true`: keygate forwards over HTTPS to a recording upstream on
//! loopback whose certificate, for the name `localhost`, comes from a CA made in the test.
//! The CA reaches keygate through `ca_file` or through `SSL_CERT_FILE`, which replaces the
//! system's roots.

mod common;

use std::io::ErrorKind;
use std::net::{Ipv6Addr, SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use common::*;
use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair, KeyUsagePurpose,
};
use rustls::pki_types::{CertificateDer, PrivatePkcs8KeyDer};
use tempfile::TempDir;

const BODY: &[u8] = br#"{"recipient":"+15550100"}"#;

/// A CA made in the test, with the private key that signs server certificates.
type TestCa = CertifiedIssuer<'static, KeyPair>;

/// Makes a CA named `name` and writes it to `dir` as `{name}.pem` and `{name}.key`.
fn make_ca(dir: &Path, name: &str) -> TestCa {
    let mut params = CertificateParams::default();
    params
        .distinguished_name
        .push(DnType::CommonName, format!("keygate test {name}"));
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign];
    let ca = CertifiedIssuer::self_signed(params, KeyPair::generate().unwrap()).unwrap();
    std::fs::write(dir.join(format!("{name}.pem")), ca.pem()).unwrap();
    std::fs::write(dir.join(format!("{name}.key")), ca.key().serialize_pem()).unwrap();
    ca
}

/// A server certificate and its private key.
struct ServerCertificate {
    certificate: CertificateDer<'static>,
    key: PrivatePkcs8KeyDer<'static>,
}

/// Makes a server certificate for the DNS name `name`, signed by `ca`.
fn make_server_certificate(ca: &TestCa, name: &str) -> ServerCertificate {
    let mut params = CertificateParams::new(vec![name.to_owned()]).unwrap();
    params.distinguished_name.push(DnType::CommonName, name);
    params.is_ca = IsCa::ExplicitNoCa;
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    let key = KeyPair::generate().unwrap();
    let certificate = params.signed_by(&key, ca).unwrap();
    ServerCertificate {
        certificate: certificate.der().clone(),
        key: PrivatePkcs8KeyDer::from(key.serialize_der()),
    }
}

/// Binds 127.0.0.1 and, where the host has IPv6, ::1 on one port picked at run time,
/// because keygate spreads requests over every address that `localhost` resolves to.
fn bind_localhost() -> Vec<TcpListener> {
    for _ in 0..20 {
        let ipv4 = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = ipv4.local_addr().unwrap().port();
        match TcpListener::bind((Ipv6Addr::LOCALHOST, port)) {
            Ok(ipv6) => return vec![ipv4, ipv6],
            Err(error) if error.kind() == ErrorKind::AddrInUse => continue,
            // Any other error, such as AddrNotAvailable, means the host has no ::1.
            Err(_) => return vec![ipv4],
        }
    }
    panic!("no port was free on both 127.0.0.1 and ::1 in 20 attempts");
}

/// A recording upstream that speaks HTTPS with one server certificate. It also records
/// the TLS server name (SNI) of every handshake that the client finished.
struct HttpsUpstream {
    recorder: Upstream,
    server_names: Arc<Mutex<Vec<Option<String>>>>,
}

impl HttpsUpstream {
    fn start(certificate: ServerCertificate) -> Self {
        // `builder` takes ring as the crypto provider, because ring is the only one that
        // this build enables in rustls.
        let config = rustls::ServerConfig::builder()
            .with_no_client_auth()
            .with_single_cert(vec![certificate.certificate], certificate.key.into())
            .unwrap();
        let config = Arc::new(config);
        let server_names = Arc::new(Mutex::new(Vec::new()));
        let names = Arc::clone(&server_names);
        let recorder = Upstream::start_with(bind_localhost(), move |mut socket: TcpStream| {
            let mut session = rustls::ServerConnection::new(Arc::clone(&config))
                .map_err(std::io::Error::other)?;
            // The whole handshake runs before any request is read, so a name is recorded
            // only once the client has finished it, never for a client that rejects the
            // certificate.
            session.complete_io(&mut socket)?;
            if session.is_handshaking() {
                return Err(ErrorKind::UnexpectedEof.into());
            }
            let name = session.server_name().map(str::to_owned);
            names.lock().unwrap().push(name);
            Ok(rustls::StreamOwned::new(session, socket))
        });
        Self {
            recorder,
            server_names,
        }
    }

    fn port(&self) -> u16 {
        self.recorder.address.port()
    }

    /// Returns the server name of every finished handshake, in order.
    fn server_names(&self) -> Vec<Option<String>> {
        self.server_names.lock().unwrap().clone()
    }
}

/// Writes a configuration for an HTTPS upstream at `localhost:{upstream_port}`, with
/// `upstream_lines` added to its `[upstream]` table. Returns the directory, the path of
/// the file and the proxy listener's address.
fn write_tls_config(upstream_port: u16, upstream_lines: &str) -> (TempDir, PathBuf, SocketAddr) {
    let listen = free_address("127.0.0.1");
    let config = test_config(&[listen], "127.0.0.1:1".parse().unwrap()).replacen(
        "address = \"127.0.0.1:1\"",
        &format!("address = \"localhost:{upstream_port}\"\ntls = true\n{upstream_lines}"),
        1,
    );
    let dir = tempfile::tempdir().unwrap();
    let config_path = dir.path().join("keygate.toml");
    std::fs::write(&config_path, config).unwrap();
    (dir, config_path, listen)
}

/// Starts keygate in front of the HTTPS upstream, with `upstream_lines` added to its
/// `[upstream]` table and `SSL_CERT_FILE` set to `roots` if given.
fn start_keygate(upstream_port: u16, upstream_lines: &str, roots: Option<&Path>) -> Keygate {
    let (dir, config_path, listen) = write_tls_config(upstream_port, upstream_lines);
    let env: Vec<(&str, &std::ffi::OsStr)> = roots
        .map(|path| ("SSL_CERT_FILE", path.as_os_str()))
        .into_iter()
        .collect();
    Keygate::start_with_env(dir, config_path, listen, &env)
}

/// Makes the CAs `ca` and `other` in a new directory, and starts an HTTPS upstream whose
/// certificate for `localhost` is signed by `ca`.
fn upstream_with_two_cas() -> (TempDir, HttpsUpstream) {
    let certificates = tempfile::tempdir().unwrap();
    let ca = make_ca(certificates.path(), "ca");
    make_ca(certificates.path(), "other");
    let upstream = HttpsUpstream::start(make_server_certificate(&ca, "localhost"));
    (certificates, upstream)
}

/// Returns the `[upstream]` line that sets `ca_file` to `path`.
fn ca_file_line(path: &Path) -> String {
    format!("ca_file = \"{}\"", path.display())
}

fn post(keygate: &Keygate) -> Response {
    let auth = format!("Bearer {KEY_A}");
    send(
        CLIENT_A,
        keygate.address,
        &request("POST", MESSAGES_A, &[("Authorization", &auth)], BODY),
    )
}

/// Checks that the upstream received exactly the one request that `post` sends.
fn assert_received_post(upstream: &HttpsUpstream) {
    let received = upstream.recorder.received();
    assert_eq!(received.len(), 1, "{received:?}");
    assert_eq!(received[0].method, "POST");
    assert_eq!(received[0].target, MESSAGES_A);
    assert_eq!(received[0].header("X-Keygate-Campaign"), Some("campaign_a"));
    assert_eq!(received[0].body, BODY);
}

/// Checks that `response` is keygate's 502 for an upstream it could not use, and that no
/// handshake finished and no request reached the upstream.
fn assert_rejected_upstream(response: &Response, upstream: &HttpsUpstream) {
    assert_eq!(response.status, 502);
    assert_eq!(response.error_code(), "upstream_unavailable");
    let server_names = upstream.server_names();
    assert!(
        server_names.is_empty(),
        "finished handshakes: {server_names:?}"
    );
    assert_eq!(
        upstream.recorder.count(),
        0,
        "no request may reach the upstream"
    );
}

#[test]
fn tls_upstream_with_trusted_certificate() {
    let certificates = tempfile::tempdir().unwrap();
    let ca = make_ca(certificates.path(), "ca");
    let upstream = HttpsUpstream::start(make_server_certificate(&ca, "localhost"));
    let keygate = start_keygate(
        upstream.port(),
        "",
        Some(&certificates.path().join("ca.pem")),
    );

    let response = post(&keygate);
    assert_eq!(response.status, 201, "{}", keygate.output());
    assert_eq!(response.json()["upstream"], true);
    assert_eq!(upstream.server_names(), [Some("localhost".to_owned())]);
    assert_received_post(&upstream);
}

#[test]
fn tls_upstream_with_untrusted_certificate_gives_502() {
    let (certificates, upstream) = upstream_with_two_cas();
    let keygate = start_keygate(
        upstream.port(),
        "",
        Some(&certificates.path().join("other.pem")),
    );

    let response = post(&keygate);
    assert_rejected_upstream(&response, &upstream);
}

#[test]
fn ca_file_replaces_the_system_roots() {
    let (certificates, upstream) = upstream_with_two_cas();

    let trusted = ca_file_line(&certificates.path().join("ca.pem"));
    let keygate = start_keygate(upstream.port(), &trusted, None);
    assert_eq!(post(&keygate).status, 201, "{}", keygate.output());
    assert_received_post(&upstream);

    let (certificates, upstream) = upstream_with_two_cas();
    let untrusted = ca_file_line(&certificates.path().join("other.pem"));
    let keygate = start_keygate(upstream.port(), &untrusted, None);
    let response = post(&keygate);
    assert_rejected_upstream(&response, &upstream);
}

#[test]
fn insecure_skip_verify_accepts_any_certificate_loudly() {
    let (certificates, upstream) = upstream_with_two_cas();
    let keygate = start_keygate(
        upstream.port(),
        "insecure_skip_verify = true",
        Some(&certificates.path().join("other.pem")),
    );
    assert_eq!(post(&keygate).status, 201, "{}", keygate.output());
    assert_received_post(&upstream);
    let output = keygate.output();
    assert!(
        output.contains("upstream TLS certificates are NOT verified"),
        "{output}"
    );
}

/// `sni` replaces the host name in the ClientHello and in the certificate check. keygate
/// still connects to `localhost`, so the name in the reserved `.test` domain is never
/// looked up.
#[test]
fn sni_sets_the_name_sent_and_verified() {
    let certificates = tempfile::tempdir().unwrap();
    let ca = make_ca(certificates.path(), "ca");
    let upstream = HttpsUpstream::start(make_server_certificate(&ca, "api.keygate.test"));
    let lines = format!(
        "sni = \"api.keygate.test\"\n{}",
        ca_file_line(&certificates.path().join("ca.pem"))
    );
    let keygate = start_keygate(upstream.port(), &lines, None);

    assert_eq!(post(&keygate).status, 201, "{}", keygate.output());
    assert_eq!(
        upstream.server_names(),
        [Some("api.keygate.test".to_owned())]
    );
    assert_received_post(&upstream);
}

#[test]
fn sni_not_in_certificate_gives_502() {
    let (certificates, upstream) = upstream_with_two_cas();
    let lines = format!(
        "sni = \"api.keygate.test\"\n{}",
        ca_file_line(&certificates.path().join("ca.pem"))
    );
    let keygate = start_keygate(upstream.port(), &lines, None);

    let response = post(&keygate);
    assert_rejected_upstream(&response, &upstream);
}

/// A CA file that Pingora 0.9.1 would panic on, or load as an empty trust store, must stop
/// `keygate run` with exit code 64. The error line names the file and the problem.
#[test]
fn invalid_ca_file_stops_start() {
    let certificates = tempfile::tempdir().unwrap();
    make_ca(certificates.path(), "ca");
    let dir = certificates.path();
    let valid = std::fs::read(dir.join("ca.pem")).unwrap();
    std::fs::write(dir.join("garbage.pem"), "this is not a certificate\n").unwrap();
    std::fs::write(dir.join("empty.pem"), "").unwrap();
    std::fs::write(dir.join("truncated.pem"), &valid[..valid.len() / 2]).unwrap();
    let cases = [
        (dir.join("garbage.pem"), "it contains no PEM certificate"),
        (dir.join("empty.pem"), "it contains no PEM certificate"),
        (
            dir.join("truncated.pem"),
            "PEM section 1 cannot be read: section end \"CERTIFICATE\" missing",
        ),
        (dir.join("ca.key"), "PEM section 1 is a private key"),
        (dir.to_path_buf(), "Is a directory"),
    ];
    for (path, problem) in cases {
        let name = path.display();
        let lines = format!("ca_file = \"{}\"", path.display());
        let (config_dir, config_path, listen) = write_tls_config(1, &lines);
        let mut keygate = Keygate::spawn_with_env(config_dir, config_path, listen, &[]);
        let code = keygate.wait_for_exit();
        let output = keygate.output();
        assert_eq!(code, Some(64), "{name}: {output}");
        let error = output
            .lines()
            .find(|line| line.contains("upstream.ca_file"))
            .unwrap_or_else(|| panic!("{name}: no error line in {output}"));
        assert!(
            error.contains(&format!("upstream.ca_file {}: ", path.display())),
            "{name}: {error}"
        );
        assert!(error.contains(problem), "{name}: {error}");
        assert!(!output.contains("panicked"), "{name}: {output}");
    }
}

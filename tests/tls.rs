//! End-to-end test of `tls = true`: keygate forwards over HTTPS to an upstream on
//! loopback whose certificate, for the name `localhost`, comes from a CA made in the test.
//! The CA reaches keygate through `SSL_CERT_FILE`, which replaces the system's roots.

mod common;

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

use common::*;
use tempfile::TempDir;

const BODY: &[u8] = br#"{"recipient":"+15550100"}"#;

/// Runs openssl with `args` in `dir` and fails the test if it fails.
fn openssl(dir: &Path, args: &[&str]) {
    let output = Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .output()
        .expect("openssl is installed");
    assert!(
        output.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&output.stderr)
    );
}

/// Makes a CA named `name` in `dir`: `{name}.pem` and `{name}.key`.
fn make_ca(dir: &Path, name: &str) {
    let (pem, key) = (format!("{name}.pem"), format!("{name}.key"));
    openssl(
        dir,
        &[
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-keyout",
            &key,
            "-out",
            &pem,
            "-days",
            "2",
            "-subj",
            &format!("/CN=keygate test {name}"),
            "-addext",
            "basicConstraints=critical,CA:TRUE",
            "-addext",
            "keyUsage=critical,keyCertSign",
        ],
    );
}

/// Makes a server certificate for `localhost` signed by the CA `ca`.
fn make_server_certificate(dir: &Path, ca: &str) {
    openssl(
        dir,
        &[
            "req",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-keyout",
            "server.key",
            "-out",
            "server.csr",
            "-subj",
            "/CN=localhost",
        ],
    );
    std::fs::write(
        dir.join("server.ext"),
        "subjectAltName=DNS:localhost\nbasicConstraints=CA:FALSE\nextendedKeyUsage=serverAuth\n",
    )
    .unwrap();
    openssl(
        dir,
        &[
            "x509",
            "-req",
            "-in",
            "server.csr",
            "-CA",
            &format!("{ca}.pem"),
            "-CAkey",
            &format!("{ca}.key"),
            "-CAcreateserial",
            "-out",
            "server.pem",
            "-days",
            "2",
            "-extfile",
            "server.ext",
        ],
    );
}

/// An HTTPS server on loopback (IPv4 and IPv6) that answers 201 and prints one line per
/// request: the method, the path and the `X-Keygate-Campaign` header.
const HTTPS_SERVER: &str = r#"
import http.server, socket, ssl, sys
class Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    def do_POST(self):
        self.rfile.read(int(self.headers.get("Content-Length", "0")))
        print("request", self.command, self.path, self.headers.get("X-Keygate-Campaign"), flush=True)
        body = b'{"tls":true}'
        self.send_response(201)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
    def log_message(self, *args):
        pass
class Server(http.server.ThreadingHTTPServer):
    address_family = socket.AF_INET6
server = Server(("::", 0), Handler)
context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
context.load_cert_chain(sys.argv[1], sys.argv[2])
server.socket = context.wrap_socket(server.socket, server_side=True)
print("port", server.server_address[1], flush=True)
server.serve_forever()
"#;

struct HttpsUpstream {
    child: Child,
    port: u16,
    lines: std::sync::mpsc::Receiver<String>,
}

impl HttpsUpstream {
    fn start(dir: &Path) -> Self {
        let mut child = Command::new("python3")
            .args(["-c", HTTPS_SERVER])
            .arg(dir.join("server.pem"))
            .arg(dir.join("server.key"))
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("python3 is installed");
        let (sender, lines) = std::sync::mpsc::channel();
        let stdout = BufReader::new(child.stdout.take().unwrap());
        std::thread::spawn(move || {
            for line in stdout.lines().map_while(Result::ok) {
                let _ = sender.send(line);
            }
        });
        let first = lines
            .recv_timeout(DEADLINE)
            .expect("the HTTPS server starts");
        let port = first.strip_prefix("port ").unwrap().parse().unwrap();
        Self { child, port, lines }
    }
}

impl Drop for HttpsUpstream {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
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

/// Makes the CAs `ca` and `other`, a server certificate from `ca`, and starts the HTTPS
/// upstream with it.
fn upstream_with_two_cas() -> (tempfile::TempDir, HttpsUpstream) {
    let certificates = tempfile::tempdir().unwrap();
    make_ca(certificates.path(), "ca");
    make_ca(certificates.path(), "other");
    make_server_certificate(certificates.path(), "ca");
    let upstream = HttpsUpstream::start(certificates.path());
    (certificates, upstream)
}

fn post(keygate: &Keygate) -> Response {
    let auth = format!("Bearer {KEY_A}");
    send(
        CLIENT_A,
        keygate.address,
        &request("POST", MESSAGES_A, &[("Authorization", &auth)], BODY),
    )
}

#[test]
fn tls_upstream_with_trusted_certificate() {
    let certificates = tempfile::tempdir().unwrap();
    make_ca(certificates.path(), "ca");
    make_server_certificate(certificates.path(), "ca");
    let upstream = HttpsUpstream::start(certificates.path());
    let keygate = start_keygate(upstream.port, "", Some(&certificates.path().join("ca.pem")));

    let response = post(&keygate);
    assert_eq!(response.status, 201, "{}", keygate.output());
    assert_eq!(response.json()["tls"], true);
    let line = upstream.lines.recv_timeout(DEADLINE).unwrap();
    assert_eq!(line, format!("request POST {MESSAGES_A} campaign_a"));
}

#[test]
fn tls_upstream_with_untrusted_certificate_gives_502() {
    let (certificates, upstream) = upstream_with_two_cas();
    let keygate = start_keygate(
        upstream.port,
        "",
        Some(&certificates.path().join("other.pem")),
    );

    let response = post(&keygate);
    assert_eq!(response.status, 502);
    assert_eq!(response.error_code(), "upstream_unavailable");
    assert!(
        upstream.lines.try_recv().is_err(),
        "no request may reach the upstream"
    );
}

#[test]
fn ca_file_replaces_the_system_roots() {
    let (certificates, upstream) = upstream_with_two_cas();

    let trusted = format!(
        "ca_file = \"{}\"",
        certificates.path().join("ca.pem").display()
    );
    let keygate = start_keygate(upstream.port, &trusted, None);
    assert_eq!(post(&keygate).status, 201, "{}", keygate.output());
    assert!(upstream.lines.recv_timeout(DEADLINE).is_ok());

    let untrusted = format!(
        "ca_file = \"{}\"",
        certificates.path().join("other.pem").display()
    );
    let keygate = start_keygate(upstream.port, &untrusted, None);
    let response = post(&keygate);
    assert_eq!(response.status, 502);
    assert_eq!(response.error_code(), "upstream_unavailable");
}

#[test]
fn insecure_skip_verify_accepts_any_certificate_loudly() {
    let (certificates, upstream) = upstream_with_two_cas();
    let keygate = start_keygate(
        upstream.port,
        "insecure_skip_verify = true",
        Some(&certificates.path().join("other.pem")),
    );
    assert_eq!(post(&keygate).status, 201, "{}", keygate.output());
    assert!(upstream.lines.recv_timeout(DEADLINE).is_ok());
    let output = keygate.output();
    assert!(
        output.contains("upstream TLS certificates are NOT verified"),
        "{output}"
    );
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

//! The check of `[upstream] ca_file` at start. Pingora 0.9.1 loads the file only when it
//! builds its TLS connector. It panics on a PEM section that it cannot read or that is not
//! a certificate, and a file without any certificate gives it an empty trust store, so
//! every request then fails with 502. This check reads the file as Pingora does and
//! rejects all of these before anything starts.

use std::io;
use std::path::{Path, PathBuf};

use pingora::tls::{RootCertStore, RusTlsError};
use rustls_pemfile::Item;

/// The reason an upstream CA file cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum CaFileError {
    #[error("failed to read upstream.ca_file {}: {source}", path.display())]
    Read { path: PathBuf, source: io::Error },
    #[error("invalid upstream.ca_file {}: PEM section {index} cannot be read: {source}; it must contain only complete PEM certificates", path.display())]
    Pem {
        path: PathBuf,
        index: usize,
        source: io::Error,
    },
    #[error("invalid upstream.ca_file {}: PEM section {index} is a {kind}; it must contain only CA certificates", path.display())]
    NotCertificate {
        path: PathBuf,
        index: usize,
        kind: &'static str,
    },
    #[error("invalid upstream.ca_file {}: PEM section {index} is not a valid CA certificate: {source}", path.display())]
    InvalidCertificate {
        path: PathBuf,
        index: usize,
        source: RusTlsError,
    },
    #[error("invalid upstream.ca_file {}: it contains no PEM certificate (a \"-----BEGIN CERTIFICATE-----\" section)", path.display())]
    NoCertificate { path: PathBuf },
}

/// Reads the CA file at `path` and returns how many certificates it contains.
///
/// Every PEM section must be a certificate that rustls accepts as a trust anchor, and there
/// must be at least one. Text outside PEM sections is ignored, as Pingora ignores it.
///
/// NOTE: Pingora 0.9.1 reads the file again when it builds its connector, so a file that
/// is replaced between this check and that read is not covered.
pub fn check(path: &Path) -> Result<usize, CaFileError> {
    let contents = std::fs::read(path).map_err(|source| CaFileError::Read {
        path: path.to_owned(),
        source,
    })?;
    let mut store = RootCertStore::empty();
    let mut reader = contents.as_slice();
    for (number, item) in rustls_pemfile::read_all(&mut reader).enumerate() {
        let index = number + 1;
        let item = item.map_err(|source| CaFileError::Pem {
            path: path.to_owned(),
            index,
            source,
        })?;
        let Item::X509Certificate(certificate) = item else {
            return Err(CaFileError::NotCertificate {
                path: path.to_owned(),
                index,
                kind: section_kind(&item),
            });
        };
        store
            .add(certificate)
            .map_err(|source| CaFileError::InvalidCertificate {
                path: path.to_owned(),
                index,
                source,
            })?;
    }
    if store.is_empty() {
        return Err(CaFileError::NoCertificate {
            path: path.to_owned(),
        });
    }
    Ok(store.len())
}

/// Names the kind of a PEM section that is not a certificate.
fn section_kind(item: &Item) -> &'static str {
    match item {
        Item::X509Certificate(_) => "certificate",
        Item::SubjectPublicKeyInfo(_) => "public key",
        Item::Pkcs1Key(_) | Item::Pkcs8Key(_) | Item::Sec1Key(_) => "private key",
        Item::Crl(_) => "certificate revocation list",
        Item::Csr(_) => "certificate signing request",
        _ => "section of another kind",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Writes `contents` to a CA file and returns the error that rejects it.
    fn error_for(contents: &[u8]) -> CaFileError {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ca.pem");
        std::fs::write(&path, contents).unwrap();
        check(&path).expect_err("the file must be rejected")
    }

    #[test]
    fn text_without_sections_has_no_certificate() {
        for contents in [&b""[..], b"not a certificate\n", b"\x00\xff\x10"] {
            let error = error_for(contents);
            assert!(
                matches!(error, CaFileError::NoCertificate { .. }),
                "{contents:?}: {error:?}"
            );
        }
    }

    #[test]
    fn unterminated_section_is_a_pem_error() {
        let error = error_for(b"-----BEGIN CERTIFICATE-----\nMIIB\n");
        assert!(
            matches!(error, CaFileError::Pem { index: 1, .. }),
            "{error:?}"
        );
        assert!(error.to_string().contains("section end"), "{error}");
    }

    #[test]
    fn private_key_is_not_a_certificate() {
        let error = error_for(b"-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n");
        let is_private_key = matches!(
            error,
            CaFileError::NotCertificate {
                index: 1,
                kind: "private key",
                ..
            }
        );
        assert!(is_private_key, "{error:?}");
    }

    #[test]
    fn certificate_section_without_certificate_is_invalid() {
        let error = error_for(b"-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n");
        assert!(
            matches!(error, CaFileError::InvalidCertificate { index: 1, .. }),
            "{error:?}"
        );
    }

    #[test]
    fn directory_cannot_be_read() {
        let dir = tempfile::tempdir().unwrap();
        let error = check(dir.path()).unwrap_err();
        assert!(matches!(error, CaFileError::Read { .. }), "{error:?}");
    }
}

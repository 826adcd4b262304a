//! TLS for listeners: rustls with ALPN (h2, http/1.1) and SNI-based selection among several
//! certificates. A client that sends no SNI, or a name no certificate covers, gets the first
//! certificate of the listener.

use std::sync::Arc;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;

use crate::error::Error;

/// One certificate of a TLS listener: PEM files of its chain and private key.
#[derive(Debug, Clone)]
pub struct CertificateConfig {
  pub cert: std::path::PathBuf,
  pub key: std::path::PathBuf,
}

/// Builds the rustls server config of one listener.
pub fn server_config(
  certificates: &[CertificateConfig],
) -> Result<Arc<rustls::ServerConfig>, Error> {
  let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
  let mut keys = Vec::with_capacity(certificates.len());
  for certificate in certificates {
    keys.push(Arc::new(load_certified_key(certificate, &provider)?));
  }
  if keys.is_empty() {
    return Err(Error::NoCertificates);
  }
  let mut config = rustls::ServerConfig::builder_with_provider(provider)
    .with_safe_default_protocol_versions()?
    .with_no_client_auth()
    .with_cert_resolver(Arc::new(SniResolver { keys }));
  config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
  Ok(Arc::new(config))
}

fn load_certified_key(
  certificate: &CertificateConfig,
  provider: &rustls::crypto::CryptoProvider,
) -> Result<CertifiedKey, Error> {
  let cert_path = certificate.cert.display().to_string();
  let key_path = certificate.key.display().to_string();
  let chain = CertificateDer::pem_file_iter(&certificate.cert)
    .and_then(|certs| certs.collect::<Result<Vec<_>, _>>())
    .map_err(|err| Error::Certificates {
      path: cert_path.clone(),
      reason: err.to_string(),
    })?;
  if chain.is_empty() {
    return Err(Error::Certificates {
      path: cert_path,
      reason: "no PEM CERTIFICATE block found".into(),
    });
  }
  let key = PrivateKeyDer::from_pem_file(&certificate.key).map_err(|err| Error::PrivateKey {
    path: key_path.clone(),
    reason: err.to_string(),
  })?;
  let key =
    CertifiedKey::from_der(chain, key, provider).map_err(|err| Error::UnusableCertificate {
      path: format!("{cert_path} + {key_path}"),
      reason: err.to_string(),
    })?;
  webpki::EndEntityCert::try_from(&key.cert[0]).map_err(|err| Error::UnusableCertificate {
    path: cert_path,
    reason: format!("not a usable end-entity certificate: {err}"),
  })?;
  Ok(key)
}

/// Chooses the first certificate whose names cover the client's SNI.
#[derive(Debug)]
struct SniResolver {
  keys: Vec<Arc<CertifiedKey>>,
}

impl ResolvesServerCert for SniResolver {
  fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
    let matching = hello
      .server_name()
      .and_then(|name| ServerName::try_from(name).ok())
      .and_then(|name| {
        self.keys.iter().find(|key| {
          webpki::EndEntityCert::try_from(&key.cert[0])
            .is_ok_and(|cert| cert.verify_is_valid_for_subject_name(&name).is_ok())
        })
      });
    matching.or_else(|| self.keys.first()).cloned()
  }
}

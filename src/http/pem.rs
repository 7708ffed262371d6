//! The certificates of a PEM file (an upstream's `caFile`), checked when the config loads.

/// Parse the PEM text of a `caFile`: its certificates (DER), or why it cannot be used.
#[cfg(feature = "tls")]
pub fn parse_ca_pem(pem: &[u8]) -> Result<Vec<Vec<u8>>, String> {
    use rustls::pki_types::CertificateDer;
    use rustls::pki_types::pem::PemObject;
    let mut out = Vec::new();
    for c in CertificateDer::pem_slice_iter(pem) {
        let c = c.map_err(|e| format!("not a PEM certificate file: {e}"))?;
        let mut roots = rustls::RootCertStore::empty();
        roots.add(c.clone()).map_err(|e| format!("unusable certificate: {e}"))?;
        out.push(c.to_vec());
    }
    if out.is_empty() {
        return Err("no PEM certificates (-----BEGIN CERTIFICATE-----) in it".into());
    }
    Ok(out)
}

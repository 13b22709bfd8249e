//! Test PKI (rcgen), a kubelet-atomic-writer-style Secret directory, and a
//! small HTTPS client (hyper over tokio-rustls) for the injector's tests
//! and benchmark.
#![allow(dead_code)]

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::client::conn::http1;
use hyper_util::rt::TokioIo;
use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair, SanType};
use rustls::RootCertStore;
use rustls_pki_types::{CertificateDer, ServerName};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use tokio_rustls::client::TlsStream;

/// A CA that issues serving certificates for the webhook's names.
pub struct TestPki {
    issuer: Issuer<'static, KeyPair>,
    /// The CA certificate.
    pub ca: CertificateDer<'static>,
}

impl TestPki {
    /// A fresh CA.
    pub fn new(cn: &str) -> Self {
        let key = KeyPair::generate().expect("CA key");
        let mut params = CertificateParams::new(Vec::<String>::new()).expect("CA params");
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.distinguished_name.push(DnType::CommonName, cn);
        let cert = params.self_signed(&key).expect("CA cert");
        Self {
            issuer: Issuer::new(params, key),
            ca: cert.der().clone(),
        }
    }

    /// A serving certificate (PEM cert, PEM key) for localhost and the
    /// in-cluster Service name.
    pub fn leaf(&self, cn: &str) -> (String, String) {
        let key = KeyPair::generate().expect("leaf key");
        let mut params = CertificateParams::new(vec![
            "localhost".to_owned(),
            "weft-injector.weft-system.svc".to_owned(),
        ])
        .expect("leaf params");
        params
            .subject_alt_names
            .push(SanType::IpAddress(std::net::IpAddr::from([127, 0, 0, 1])));
        params.distinguished_name.push(DnType::CommonName, cn);
        let cert = params.signed_by(&key, &self.issuer).expect("leaf cert");
        (cert.pem(), key.serialize_pem())
    }
}

/// A directory laid out like kubelet's atomic writer: `..<gen>/` holds the
/// files, `..data` points at it, and each file name is a symlink through
/// `..data`. [`AtomicDir::publish`] swaps `..data` with a rename.
pub struct AtomicDir {
    dir: tempfile::TempDir,
    generation: u32,
}

impl AtomicDir {
    /// An empty directory.
    pub fn new() -> Self {
        Self {
            dir: tempfile::tempdir().expect("tempdir"),
            generation: 0,
        }
    }

    /// The mount path.
    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    /// Publishes a new set of files the way kubelet does.
    pub fn publish(&mut self, files: &[(&str, &[u8])]) {
        let root = self.dir.path();
        let old = std::fs::read_link(root.join("..data")).ok();
        self.generation += 1;
        let ts = format!(
            "..2026_11_22_00_00_{:02}.{}",
            self.generation,
            std::process::id()
        );
        let ts_dir = root.join(&ts);
        std::fs::create_dir(&ts_dir).expect("create timestamp dir");
        for (name, content) in files {
            std::fs::write(ts_dir.join(name), content).expect("write file");
        }
        std::os::unix::fs::symlink(&ts, root.join("..data_tmp")).expect("symlink ..data_tmp");
        std::fs::rename(root.join("..data_tmp"), root.join("..data")).expect("swap ..data");
        for (name, _) in files {
            let link = root.join(name);
            if std::fs::symlink_metadata(&link).is_err() {
                std::os::unix::fs::symlink(PathBuf::from("..data").join(name), &link)
                    .expect("file symlink");
            }
        }
        if let Some(old) = old {
            std::fs::remove_dir_all(root.join(old)).expect("remove old generation");
        }
    }
}

/// A TLS client config trusting `ca` only.
pub fn client_config(ca: &CertificateDer<'static>) -> Arc<rustls::ClientConfig> {
    let mut roots = RootCertStore::empty();
    roots.add(ca.clone()).expect("add CA");
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    Arc::new(
        rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .expect("protocol versions")
            .with_root_certificates(roots)
            .with_no_client_auth(),
    )
}

/// A TLS connection to `addr`, verifying the name `localhost`.
pub async fn tls_connect(
    addr: SocketAddr,
    cfg: Arc<rustls::ClientConfig>,
) -> std::io::Result<TlsStream<TcpStream>> {
    let tcp = TcpStream::connect(addr).await?;
    let name = ServerName::try_from("localhost").expect("server name");
    TlsConnector::from(cfg).connect(name, tcp).await
}

/// The leaf certificate the server presented on `stream`.
pub fn peer_leaf(stream: &TlsStream<TcpStream>) -> CertificateDer<'static> {
    stream
        .get_ref()
        .1
        .peer_certificates()
        .and_then(|c| c.first())
        .expect("server presented a certificate")
        .clone()
        .into_owned()
}

/// A TLS client config trusting `ca` that offers only HTTP/2 by ALPN, as
/// Go's HTTP client (kube-apiserver's webhook client) prefers.
pub fn h2_client_config(ca: &CertificateDer<'static>) -> Arc<rustls::ClientConfig> {
    let mut cfg = (*client_config(ca)).clone();
    cfg.alpn_protocols = vec![b"h2".to_vec()];
    Arc::new(cfg)
}

/// One keep-alive HTTP/1.1 connection over TLS.
pub struct Conn {
    sender: http1::SendRequest<Full<Bytes>>,
    /// Leaf certificate presented by the server.
    pub leaf: CertificateDer<'static>,
}

impl Conn {
    /// Connects and completes the TLS and HTTP handshakes.
    pub async fn open(addr: SocketAddr, cfg: Arc<rustls::ClientConfig>) -> anyhow::Result<Self> {
        let tls = tls_connect(addr, cfg).await?;
        let leaf = peer_leaf(&tls);
        let (sender, conn) = http1::handshake(TokioIo::new(tls)).await?;
        tokio::spawn(async move {
            let _ = conn.await;
        });
        Ok(Self { sender, leaf })
    }

    /// Sends one request and reads the whole response.
    pub async fn request(
        &mut self,
        method: &str,
        path: &str,
        body: Vec<u8>,
    ) -> anyhow::Result<(http::StatusCode, Bytes)> {
        let req = http::Request::builder()
            .method(method)
            .uri(path)
            .header("host", "localhost")
            .header("content-type", "application/json")
            .body(Full::new(Bytes::from(body)))?;
        self.sender.ready().await?;
        let resp = self.sender.send_request(req).await?;
        let status = resp.status();
        let body = resp.into_body().collect().await?.to_bytes();
        Ok((status, body))
    }
}

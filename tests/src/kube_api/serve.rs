//! Accepting connections (plain or TLS) and serving HTTP/1.1 on them.
//!
//! Every connection is a task in one set owned by the accept loop: aborting
//! that loop drops the listener and the set, which aborts every connection,
//! so [`super::KubeApi::stop`] closes even the open watches at once.

use std::{fs, path::Path, sync::Arc, time::Duration};

use anyhow::{Context, Result};
use hyper::{server::conn::http1, service::service_fn};
use hyper_util::rt::TokioIo;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject};
use tokio::{net::TcpListener, task::JoinSet};
use tokio_rustls::TlsAcceptor;

use super::{Shared, http};

/// A TLS acceptor for the server's certificate and key (PEM), with rustls'
/// ring provider and HTTP/1.1 as the only ALPN protocol (Go clients would
/// otherwise try HTTP/2).
pub(super) fn acceptor(cert: &Path, key: &Path) -> Result<TlsAcceptor> {
    let pem = fs::read(cert).with_context(|| format!("reading {}", cert.display()))?;
    let certs = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<Vec<_>, _>>()
        .with_context(|| format!("parsing {}", cert.display()))?;
    let key =
        PrivateKeyDer::from_pem_file(key).with_context(|| format!("reading {}", key.display()))?;
    let mut config = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()?
    .with_no_client_auth()
    .with_single_cert(certs, key)
    .context("server certificate")?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(TlsAcceptor::from(Arc::new(config)))
}

pub(super) async fn accept_loop(
    listener: TcpListener,
    tls: Option<TlsAcceptor>,
    shared: Arc<Shared>,
) {
    let mut conns = JoinSet::new();
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((sock, _)) => {
                    let _ = sock.set_nodelay(true);
                    conns.spawn(serve_conn(sock, tls.clone(), shared.clone()));
                }
                // Out of file descriptors and the like: try again shortly.
                Err(_) => tokio::time::sleep(Duration::from_millis(10)).await,
            },
            Some(_) = conns.join_next(), if !conns.is_empty() => {}
        }
    }
}

async fn serve_conn(sock: tokio::net::TcpStream, tls: Option<TlsAcceptor>, shared: Arc<Shared>) {
    let svc = service_fn(move |req| http::handle(shared.clone(), req));
    let builder = http1::Builder::new();
    match tls {
        Some(acceptor) => {
            let Ok(stream) = acceptor.accept(sock).await else {
                return;
            };
            let _ = builder.serve_connection(TokioIo::new(stream), svc).await;
        }
        None => {
            let _ = builder.serve_connection(TokioIo::new(sock), svc).await;
        }
    }
}

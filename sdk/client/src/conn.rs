//! Client transports: dial a server URL (tcp, tls, ws, wss, quic) and exchange whole frames.

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;

use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use im_proto::codec::{FrameError, FrameReader};
use rustls::pki_types::{CertificateDer, ServerName};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::{self, Message, protocol::WebSocketConfig};
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

use crate::ClientError;

/// Which certificates the client trusts for tls, wss and quic.
#[derive(Clone, Debug, Default)]
pub enum Trust {
    /// The operating system's root certificates.
    #[default]
    System,
    /// Exactly these certificates (for example a server's self-signed one).
    Certificates(Vec<CertificateDer<'static>>),
    /// Trust any certificate. For development only: it defeats TLS.
    InsecureAnyCertificate,
}

impl Trust {
    /// Trusts the certificates in a PEM file.
    pub fn pem_file(path: &std::path::Path) -> Result<Self, ClientError> {
        let pem = std::fs::read(path)
            .map_err(|e| ClientError::Config(format!("reading {}: {e}", path.display())))?;
        let certs = rustls_pemfile::certs(&mut pem.as_slice())
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| ClientError::Config(format!("parsing {}: {e}", path.display())))?;
        if certs.is_empty() {
            return Err(ClientError::Config(format!(
                "{} holds no certificate",
                path.display()
            )));
        }
        Ok(Trust::Certificates(certs))
    }
}

/// A parsed server address.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ServerUrl {
    /// `tcp://host:port` (plain) or `tls://host:port`.
    Tcp { host: String, port: u16, tls: bool },
    /// `ws://host:port/path` or `wss://...`.
    WebSocket {
        url: String,
        host: String,
        port: u16,
        tls: bool,
    },
    /// `quic://host:port`.
    Quic { host: String, port: u16 },
}

impl std::str::FromStr for ServerUrl {
    type Err = ClientError;

    fn from_str(s: &str) -> Result<Self, ClientError> {
        let url = url::Url::parse(s)
            .map_err(|e| ClientError::Config(format!("bad server url {s:?}: {e}")))?;
        let host = url
            .host_str()
            .ok_or_else(|| ClientError::Config(format!("server url {s:?} has no host")))?
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_owned();
        let port = url.port_or_known_default();
        let need_port = || ClientError::Config(format!("server url {s:?} needs a port"));
        match url.scheme() {
            "tcp" | "tls" => Ok(ServerUrl::Tcp {
                host,
                port: port.ok_or_else(need_port)?,
                tls: url.scheme() == "tls",
            }),
            "ws" | "wss" => Ok(ServerUrl::WebSocket {
                url: s.to_owned(),
                host,
                port: port.ok_or_else(need_port)?,
                tls: url.scheme() == "wss",
            }),
            "quic" => Ok(ServerUrl::Quic {
                host,
                port: port.ok_or_else(need_port)?,
            }),
            other => Err(ClientError::Config(format!(
                "unknown scheme {other:?}: use tcp, tls, ws, wss or quic"
            ))),
        }
    }
}

pub trait Io: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Io for T {}

/// A raw connection to the server: whole frames in and out, no login, no reliability.
///
/// [`crate::Client`] builds on it; it is public for tools and protocol tests.
// The stream variant carries the frame reader's small inline buffer; one connection exists
// per client, so the size difference costs nothing worth an extra indirection per read.
#[allow(clippy::large_enum_variant)]
pub enum Connection {
    Stream {
        io: Box<dyn Io>,
        reader: FrameReader,
        /// Keeps a QUIC connection (and its endpoint) alive; closed on drop.
        quic: Option<(quinn::Connection, quinn::Endpoint)>,
    },
    WebSocket(Box<WebSocketStream<MaybeTlsStream<TcpStream>>>),
}

impl Drop for Connection {
    fn drop(&mut self) {
        if let Connection::Stream {
            quic: Some((connection, _)),
            ..
        } = self
        {
            connection.close(0u32.into(), b"client closed");
        }
    }
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn tls_config(
    trust: &Trust,
    alpn: &[&[u8]],
    tls13_only: bool,
) -> Result<rustls::ClientConfig, ClientError> {
    let builder = rustls::ClientConfig::builder_with_provider(provider());
    let builder = if tls13_only {
        builder.with_protocol_versions(&[&rustls::version::TLS13])
    } else {
        builder.with_safe_default_protocol_versions()
    }
    .map_err(|e| ClientError::Config(e.to_string()))?;
    let mut config = match trust {
        Trust::InsecureAnyCertificate => builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(insecure::AnyCertificate(provider())))
            .with_no_client_auth(),
        Trust::System | Trust::Certificates(_) => {
            let mut roots = rustls::RootCertStore::empty();
            match trust {
                Trust::Certificates(certs) => {
                    for cert in certs {
                        roots
                            .add(cert.clone())
                            .map_err(|e| ClientError::Config(format!("bad certificate: {e}")))?;
                    }
                }
                _ => {
                    let native = rustls_native_certs::load_native_certs();
                    for cert in native.certs {
                        let _ = roots.add(cert);
                    }
                }
            }
            builder.with_root_certificates(roots).with_no_client_auth()
        }
    };
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    Ok(config)
}

fn server_name(host: &str) -> Result<ServerName<'static>, ClientError> {
    ServerName::try_from(host.to_owned())
        .map_err(|e| ClientError::Config(format!("bad server name {host:?}: {e}")))
}

async fn resolve(host: &str, port: u16) -> Result<SocketAddr, ClientError> {
    tokio::net::lookup_host((host, port))
        .await
        .map_err(|e| ClientError::Connect(format!("resolving {host}: {e}")))?
        .next()
        .ok_or_else(|| ClientError::Connect(format!("{host} has no address")))
}

impl Connection {
    /// Opens a connection (no login yet).
    pub async fn dial(
        url: &ServerUrl,
        trust: &Trust,
        max_frame_bytes: usize,
        quic_endpoint: Option<&quinn::Endpoint>,
    ) -> Result<Connection, ClientError> {
        let connect_err = |e: &dyn std::fmt::Display| ClientError::Connect(e.to_string());
        match url {
            ServerUrl::Tcp { host, port, tls } => {
                let stream = TcpStream::connect((host.as_str(), *port))
                    .await
                    .map_err(|e| connect_err(&e))?;
                let _ = stream.set_nodelay(true);
                let io: Box<dyn Io> = if *tls {
                    let connector =
                        tokio_rustls::TlsConnector::from(Arc::new(tls_config(trust, &[], false)?));
                    Box::new(
                        connector
                            .connect(server_name(host)?, stream)
                            .await
                            .map_err(|e| connect_err(&e))?,
                    )
                } else {
                    Box::new(stream)
                };
                Ok(Connection::Stream {
                    io,
                    reader: FrameReader::new(max_frame_bytes),
                    quic: None,
                })
            }
            ServerUrl::WebSocket { url, tls, .. } => {
                let connector = if *tls {
                    Some(tokio_tungstenite::Connector::Rustls(Arc::new(tls_config(
                        trust,
                        &[b"http/1.1"],
                        false,
                    )?)))
                } else {
                    Some(tokio_tungstenite::Connector::Plain)
                };
                let config = WebSocketConfig::default()
                    .read_buffer_size(16 * 1024)
                    .max_message_size(Some(max_frame_bytes))
                    .max_frame_size(Some(max_frame_bytes));
                let (ws, _) = tokio_tungstenite::connect_async_tls_with_config(
                    url.as_str(),
                    Some(config),
                    true,
                    connector,
                )
                .await
                .map_err(|e| connect_err(&e))?;
                Ok(Connection::WebSocket(Box::new(ws)))
            }
            ServerUrl::Quic { host, port } => {
                let addr = resolve(host, *port).await?;
                let endpoint = match quic_endpoint {
                    Some(endpoint) => endpoint.clone(),
                    None => {
                        let bind: SocketAddr = if addr.is_ipv6() {
                            "[::]:0".parse().expect("addr")
                        } else {
                            "0.0.0.0:0".parse().expect("addr")
                        };
                        quinn::Endpoint::client(bind).map_err(|e| connect_err(&e))?
                    }
                };
                let tls = tls_config(trust, &[im_proto::QUIC_ALPN], true)?;
                let crypto = quinn::crypto::rustls::QuicClientConfig::try_from(tls)
                    .map_err(|e| ClientError::Config(e.to_string()))?;
                let config = quinn::ClientConfig::new(Arc::new(crypto));
                let connection = endpoint
                    .connect_with(config, addr, host)
                    .map_err(|e| connect_err(&e))?
                    .await
                    .map_err(|e| connect_err(&e))?;
                let (send, recv) = connection.open_bi().await.map_err(|e| connect_err(&e))?;
                Ok(Connection::Stream {
                    io: Box::new(tokio::io::join(recv, send)),
                    reader: FrameReader::new(max_frame_bytes),
                    quic: Some((connection, endpoint)),
                })
            }
        }
    }

    /// The next frame; `Ok(None)` when the server closed. Cancel-safe.
    pub async fn recv(&mut self) -> io::Result<Option<Bytes>> {
        match self {
            Connection::Stream { io, reader, .. } => match reader.read_frame(io).await {
                Ok(frame) => Ok(frame),
                Err(FrameError::Io(e)) => Err(e),
                Err(e) => Err(io::Error::new(io::ErrorKind::InvalidData, e.to_string())),
            },
            Connection::WebSocket(ws) => loop {
                match ws.next().await {
                    None => return Ok(None),
                    Some(Ok(Message::Binary(data))) => return Ok(Some(data)),
                    Some(Ok(Message::Close(_))) => return Ok(None),
                    Some(Ok(_)) => continue,
                    Some(Err(
                        tungstenite::Error::ConnectionClosed | tungstenite::Error::AlreadyClosed,
                    )) => {
                        return Ok(None);
                    }
                    Some(Err(e)) => return Err(io::Error::other(e)),
                }
            },
        }
    }

    /// Writes frames in order.
    pub async fn send(&mut self, frames: &[Bytes]) -> io::Result<()> {
        match self {
            Connection::Stream { io, .. } => {
                let mut buf = Vec::with_capacity(frames.iter().map(|f| f.len() + 4).sum());
                for f in frames {
                    im_proto::codec::put_frame(&mut buf, f);
                }
                io.write_all(&buf).await?;
                io.flush().await
            }
            Connection::WebSocket(ws) => {
                for f in frames {
                    ws.feed(Message::Binary(f.clone()))
                        .await
                        .map_err(io::Error::other)?;
                }
                ws.flush().await.map_err(io::Error::other)
            }
        }
    }

    /// Writes `bytes` as they are, beneath any framing: no length prefix, and on WebSocket
    /// straight onto the socket under the WebSocket framing. For protocol tests that need
    /// malformed input.
    pub async fn send_unframed(&mut self, bytes: &[u8]) -> io::Result<()> {
        match self {
            Connection::Stream { io, .. } => {
                io.write_all(bytes).await?;
                io.flush().await
            }
            Connection::WebSocket(ws) => ws
                .send(Message::Binary(Bytes::copy_from_slice(bytes)))
                .await
                .map_err(io::Error::other),
        }
    }

    /// Sends a WebSocket text message (refused by the server); an error on other transports.
    pub async fn send_websocket_text(&mut self, text: &str) -> io::Result<()> {
        match self {
            Connection::WebSocket(ws) => ws
                .send(Message::Text(text.into()))
                .await
                .map_err(io::Error::other),
            Connection::Stream { .. } => Err(io::Error::other("not a WebSocket")),
        }
    }

    /// Closes politely.
    pub async fn close(&mut self) {
        match self {
            Connection::Stream { io, .. } => {
                let _ = io.shutdown().await;
            }
            Connection::WebSocket(ws) => {
                let _ = WebSocketStream::close(ws, None).await;
            }
        }
    }
}

mod insecure {
    //! A verifier that accepts any certificate (`Trust::InsecureAnyCertificate`).
    use std::sync::Arc;

    use rustls::DigitallySignedStruct;
    use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
    use rustls::pki_types::{CertificateDer, ServerName, UnixTime};

    #[derive(Debug)]
    pub struct AnyCertificate(pub Arc<rustls::crypto::CryptoProvider>);

    impl ServerCertVerifier for AnyCertificate {
        fn verify_server_cert(
            &self,
            _end_entity: &CertificateDer<'_>,
            _intermediates: &[CertificateDer<'_>],
            _server_name: &ServerName<'_>,
            _ocsp_response: &[u8],
            _now: UnixTime,
        ) -> Result<ServerCertVerified, rustls::Error> {
            Ok(ServerCertVerified::assertion())
        }

        fn verify_tls12_signature(
            &self,
            message: &[u8],
            cert: &CertificateDer<'_>,
            dss: &DigitallySignedStruct,
        ) -> Result<HandshakeSignatureValid, rustls::Error> {
            rustls::crypto::verify_tls12_signature(
                message,
                cert,
                dss,
                &self.0.signature_verification_algorithms,
            )
        }

        fn verify_tls13_signature(
            &self,
            message: &[u8],
            cert: &CertificateDer<'_>,
            dss: &DigitallySignedStruct,
        ) -> Result<HandshakeSignatureValid, rustls::Error> {
            rustls::crypto::verify_tls13_signature(
                message,
                cert,
                dss,
                &self.0.signature_verification_algorithms,
            )
        }

        fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
            self.0.signature_verification_algorithms.supported_schemes()
        }
    }
}

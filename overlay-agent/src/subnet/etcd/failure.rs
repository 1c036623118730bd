//! Whether an etcd failure is worth retrying, decided from the error's
//! types (the `etcd_client` variant, the gRPC code, and the I/O and TLS
//! errors found by walking its sources), never from its text.
//!
//! What a restart, a crash or a network blip of etcd looks like (a refused
//! or reset connection, a TLS handshake cut short, `UNAVAILABLE`, a lost
//! election, a timeout) is [`Failure::Transient`]. What only a change of
//! the agent's flags or of etcd's set-up can fix (a server certificate our
//! CA does not verify, a TLS alert refusing ours, a wrong password, missing
//! permissions) is [`Failure::Config`]. Anything not known to be
//! configuration is transient: the agent then logs and retries instead of
//! leaving the node without a control plane.

use std::{error::Error as StdError, io};

use etcd_client::Error as ClientError;
use tonic::{Code, ConnectError, Status};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Failure {
    /// Retry with backoff: etcd or the way to it is down for now.
    Transient,
    /// Stop with the reason: retrying cannot fix it.
    Config,
}

/// The failure class of one `etcd_client` error.
pub fn classify(e: &ClientError) -> Failure {
    match e {
        // A request or an endpoint we built wrongly.
        ClientError::InvalidArgs(_)
        | ClientError::InvalidUri(_)
        | ClientError::InvalidMetadataValue(_)
        | ClientError::EndpointsNotManaged => Failure::Config,
        ClientError::IoError(e) => transport(e),
        ClientError::TransportError(e) => transport(e),
        ClientError::GRpcStatus(s) => status(s),
        // Stream and lease-keeper trouble, bad UTF-8 in a response, the
        // client's own internal errors: nothing the flags decide.
        _ => Failure::Transient,
    }
}

fn status(s: &Status) -> Failure {
    // A status with a source was made on this side from a connection
    // problem (tonic maps them to UNAVAILABLE, UNKNOWN, CANCELLED...): the
    // code says nothing of the server, the source says what happened.
    if let Some(source) = s.source() {
        return transport(source);
    }
    match s.code() {
        // etcd's refusals of our credentials or of what we may do: bad
        // password or no user (INVALID_ARGUMENT), token refused after a
        // fresh login, role without the permission, auth not enabled for
        // a user we were given; or not an etcd v3 server at all.
        Code::Unauthenticated
        | Code::PermissionDenied
        | Code::InvalidArgument
        | Code::FailedPrecondition
        | Code::Unimplemented => Failure::Config,
        // UNAVAILABLE (no leader, leader changed, stopping), DEADLINE_EXCEEDED,
        // ABORTED, RESOURCE_EXHAUSTED (too many requests), UNKNOWN, ...
        _ => Failure::Transient,
    }
}

/// Connection problems: transient, unless TLS itself failed. rustls reports
/// every TLS failure (a certificate that does not verify, a fatal alert from
/// the server, a peer that does not speak TLS) as an `InvalidData` I/O error,
/// keeping the `rustls::Error` inside it unless h2 flattened it to text on
/// the way up; a restart only ever cuts the connection (`ConnectionRefused`,
/// `ConnectionReset`, `BrokenPipe`, `UnexpectedEof` as in "tls handshake
/// eof", `TimedOut`).
fn transport(e: &(dyn StdError + 'static)) -> Failure {
    for cause in causes(e) {
        if cause.is::<rustls::Error>() {
            return Failure::Config;
        }
        if let Some(io) = cause.downcast_ref::<io::Error>()
            && matches!(
                io.kind(),
                io::ErrorKind::InvalidData | io::ErrorKind::InvalidInput
            )
        {
            return Failure::Config;
        }
    }
    Failure::Transient
}

/// `e` and its sources, outermost first. `io::Error::source` skips the error
/// it wraps (it returns that error's source), so the wrapped one is visited
/// through `get_ref`.
pub fn causes<'a>(e: &'a (dyn StdError + 'static)) -> Vec<&'a (dyn StdError + 'static)> {
    let mut out: Vec<&'a (dyn StdError + 'static)> = Vec::new();
    let mut cur = Some(e);
    while let Some(c) = cur {
        out.push(c);
        if out.len() >= 32 {
            break;
        }
        cur = match c.downcast_ref::<io::Error>().and_then(|io| io.get_ref()) {
            Some(inner) => Some(inner as &(dyn StdError + 'static)),
            None => c.source(),
        };
    }
    out
}

/// The error inside an `etcd_client` error, where there is one (that type
/// names no source itself).
fn inner(e: &ClientError) -> Option<&(dyn StdError + 'static)> {
    match e {
        ClientError::IoError(e) => Some(e),
        ClientError::TransportError(e) => Some(e),
        ClientError::GRpcStatus(s) => Some(s),
        _ => None,
    }
}

fn all_causes(e: &ClientError) -> Vec<&(dyn StdError + 'static)> {
    inner(e).map(causes).unwrap_or_default()
}

/// The TLS error behind `e`, if rustls kept its type.
pub fn tls_error(e: &ClientError) -> Option<&rustls::Error> {
    all_causes(e)
        .into_iter()
        .find_map(|c| c.downcast_ref::<rustls::Error>())
}

/// Whether the request never left this host: the connection to the member
/// it was balanced to could not be made (refused, unreachable), so sending
/// it again may reach a live member.
pub fn not_sent(e: &ClientError) -> bool {
    match e {
        ClientError::TransportError(_) => true,
        ClientError::GRpcStatus(_) => all_causes(e).iter().any(|c| c.is::<ConnectError>()),
        _ => false,
    }
}

/// Whether the server ended an established connection: reset, closed
/// (hyper cancels the requests queued on it), or with a TLS alert.
pub fn connection_dropped(e: &ClientError) -> bool {
    if let ClientError::GRpcStatus(s) = e
        && s.code() == Code::Cancelled
        && s.source().is_some()
    {
        return true;
    }
    all_causes(e).iter().any(|c| {
        c.downcast_ref::<io::Error>().is_some_and(|io| {
            matches!(
                io.kind(),
                io::ErrorKind::ConnectionReset
                    | io::ErrorKind::BrokenPipe
                    | io::ErrorKind::UnexpectedEof
                    | io::ErrorKind::InvalidData
            )
        })
    })
}

/// Whether etcd itself refused the request (a gRPC code it sent, not one
/// made here from a connection problem) for a reason of configuration.
pub fn refused_by_server(e: &ClientError) -> bool {
    matches!(e, ClientError::GRpcStatus(s) if s.source().is_none())
        && classify(e) == Failure::Config
}

/// A one-line account: the gRPC message (or the error), then the innermost
/// cause when that does not already say it (tonic's `Display` would print
/// the whole source with `Debug`).
pub fn describe(e: &ClientError) -> String {
    let (head, source) = match e {
        ClientError::GRpcStatus(s) if s.message().is_empty() => {
            (format!("{:?}", s.code()), s.source())
        }
        ClientError::GRpcStatus(s) => (s.message().to_owned(), s.source()),
        _ => (e.to_string(), inner(e)),
    };
    match source.and_then(|s| causes(s).last().map(|c| c.to_string())) {
        Some(last) if !head.contains(&last) => format!("{head}: {last}"),
        _ => head,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn io(kind: io::ErrorKind) -> io::Error {
        io::Error::new(kind, "x")
    }

    /// As tonic makes a status from a failed connection attempt.
    fn connect_failed(cause: io::Error) -> ClientError {
        ClientError::GRpcStatus(Status::from_error(Box::new(ConnectError(Box::new(cause)))))
    }

    /// As tonic makes a status from a connection that broke under a request
    /// (hyper's error, here any error wrapping the I/O error).
    fn broke(cause: io::Error) -> ClientError {
        #[derive(Debug, thiserror::Error)]
        #[error("connection error")]
        struct Hyper(#[source] io::Error);
        ClientError::GRpcStatus(Status::from_error(Box::new(Hyper(cause))))
    }

    fn from_server(code: Code) -> ClientError {
        ClientError::GRpcStatus(Status::new(code, "etcdserver: something"))
    }

    #[test]
    fn a_restart_is_transient() {
        use io::ErrorKind::*;
        for kind in [
            ConnectionRefused,
            ConnectionReset,
            ConnectionAborted,
            BrokenPipe,
            UnexpectedEof,
            TimedOut,
            NotConnected,
        ] {
            assert_eq!(
                classify(&connect_failed(io(kind))),
                Failure::Transient,
                "{kind:?}"
            );
            assert_eq!(classify(&broke(io(kind))), Failure::Transient, "{kind:?}");
        }
        assert_eq!(
            classify(&ClientError::IoError(io(ConnectionReset))),
            Failure::Transient
        );
    }

    #[test]
    fn server_codes_of_a_cluster_in_trouble_are_transient() {
        for code in [
            Code::Unavailable,
            Code::DeadlineExceeded,
            Code::Aborted,
            Code::ResourceExhausted,
            Code::Unknown,
            Code::Internal,
            Code::Cancelled,
        ] {
            assert_eq!(classify(&from_server(code)), Failure::Transient, "{code:?}");
        }
    }

    #[test]
    fn credentials_and_permissions_are_configuration() {
        for code in [
            Code::Unauthenticated,
            Code::PermissionDenied,
            Code::InvalidArgument,
            Code::FailedPrecondition,
            Code::Unimplemented,
        ] {
            let e = from_server(code);
            assert_eq!(classify(&e), Failure::Config, "{code:?}");
            assert!(refused_by_server(&e));
        }
    }

    #[test]
    fn a_code_made_here_from_a_connection_problem_is_not_the_servers() {
        // A connection refused with EACCES (a local firewall) under a
        // status tonic made: its source says it was the connection, not etcd.
        let e = connect_failed(io(io::ErrorKind::PermissionDenied));
        assert_eq!(classify(&e), Failure::Transient);
        assert!(!refused_by_server(&e));
    }

    #[test]
    fn tls_failures_are_configuration() {
        let unknown_ca = rustls::Error::InvalidCertificate(rustls::CertificateError::UnknownIssuer);
        let e = connect_failed(io::Error::new(io::ErrorKind::InvalidData, unknown_ca));
        assert_eq!(classify(&e), Failure::Config);
        assert!(matches!(
            tls_error(&e),
            Some(rustls::Error::InvalidCertificate(
                rustls::CertificateError::UnknownIssuer
            ))
        ));
        // An alert refusing our certificate, as h2 hands it on: the kind
        // is kept, the rustls error is text by then.
        let alert = broke(io::Error::new(
            io::ErrorKind::InvalidData,
            "received fatal alert: BadCertificate",
        ));
        assert_eq!(classify(&alert), Failure::Config);
        assert!(tls_error(&alert).is_none());
        assert!(connection_dropped(&alert));
    }

    #[test]
    fn a_failed_connection_attempt_was_not_sent() {
        assert!(not_sent(&connect_failed(io(
            io::ErrorKind::ConnectionRefused
        ))));
        assert!(!not_sent(&broke(io(io::ErrorKind::ConnectionReset))));
        assert!(!not_sent(&from_server(Code::Unavailable)));
    }

    #[test]
    fn describe_names_the_innermost_cause_once() {
        let e = connect_failed(io::Error::new(
            io::ErrorKind::ConnectionRefused,
            "Connection refused",
        ));
        let d = describe(&e);
        assert_eq!(d.matches("Connection refused").count(), 1, "{d}");
        assert_eq!(
            describe(&from_server(Code::InvalidArgument)),
            "etcdserver: something"
        );
    }

    #[test]
    fn causes_look_inside_io_errors() {
        let e = io::Error::new(
            io::ErrorKind::InvalidData,
            rustls::Error::InvalidCertificate(rustls::CertificateError::Expired),
        );
        let c = causes(&e);
        assert!(c.iter().any(|c| c.is::<rustls::Error>()));
        assert!(e.source().is_none_or(|s| !s.is::<rustls::Error>()));
    }
}

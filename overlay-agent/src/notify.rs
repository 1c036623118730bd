//! systemd's readiness protocol (`Type=notify`): when `NOTIFY_SOCKET` is set,
//! one datagram `READY=1` once subnet.env is written and the datapath is
//! programmed, so units ordered after ours (a container runtime reading
//! subnet.env) start only then. Without `NOTIFY_SOCKET` nothing is sent.

use std::{
    io,
    os::{
        linux::net::SocketAddrExt,
        unix::net::{SocketAddr, UnixDatagram},
    },
};

#[derive(Debug, thiserror::Error)]
#[error("notifying systemd at {socket}")]
pub struct NotifyError {
    pub socket: String,
    #[source]
    pub source: io::Error,
}

/// The datagram for readiness, with a status line for `systemctl status`.
pub fn ready_message(status: &str) -> String {
    format!("READY=1\nSTATUS={}\n", status.replace('\n', " "))
}

/// `NOTIFY_SOCKET`'s address: a path, or an abstract name written `@name`.
pub fn socket_address(value: &str) -> io::Result<SocketAddr> {
    match value.strip_prefix('@') {
        Some(name) => SocketAddr::from_abstract_name(name.as_bytes()),
        None => SocketAddr::from_pathname(value),
    }
}

/// Sends `READY=1`; `Ok(false)` when not run under systemd (no `NOTIFY_SOCKET`).
pub fn ready(status: &str) -> Result<bool, NotifyError> {
    let Some(value) = std::env::var_os("NOTIFY_SOCKET") else {
        return Ok(false);
    };
    let value = value.to_string_lossy().into_owned();
    let err = |source| NotifyError {
        socket: value.clone(),
        source,
    };
    let addr = socket_address(&value).map_err(err)?;
    let sock = UnixDatagram::unbound().map_err(err)?;
    sock.send_to_addr(ready_message(status).as_bytes(), &addr)
        .map_err(err)?;
    Ok(true)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn message_is_systemds() {
        assert_eq!(
            ready_message("lease 10.5.52.0/24\non flannel.1"),
            "READY=1\nSTATUS=lease 10.5.52.0/24 on flannel.1\n"
        );
    }

    #[test]
    fn path_and_abstract_sockets_receive_it() {
        let dir = std::env::temp_dir().join(format!("overlay-notify-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("notify.sock");
        let by_path = UnixDatagram::bind(&path).unwrap();
        let name = format!("overlay-notify-test-{}", std::process::id());
        let by_name =
            UnixDatagram::bind_addr(&SocketAddr::from_abstract_name(name.as_bytes()).unwrap())
                .unwrap();
        for (value, sock) in [
            (path.to_string_lossy().into_owned(), &by_path),
            (format!("@{name}"), &by_name),
        ] {
            let addr = socket_address(&value).unwrap();
            UnixDatagram::unbound()
                .unwrap()
                .send_to_addr(ready_message("x").as_bytes(), &addr)
                .unwrap();
            let mut buf = [0u8; 64];
            let n = sock.recv(&mut buf).unwrap();
            assert_eq!(&buf[..n], b"READY=1\nSTATUS=x\n");
        }
        let _ = std::fs::remove_dir_all(&dir);
    }
}

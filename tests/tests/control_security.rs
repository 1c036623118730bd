//! etcd with TLS client certificates and with username/password auth, as
//! started by the tests (certificates made with openssl): the right
//! material works, a wrong CA, a missing client certificate or a wrong
//! password is a clear, permanent error.

use overlay_agent::subnet::etcd::{EtcdError, Registry};
use overlay_tests::etcd::{Etcd, EtcdSpec};

const PREFIX: &str = "/coreos.com/network";
const CONFIG: &str = r#"{"Network":"10.0.0.0/16","Backend":{"Type":"vxlan"}}"#;

fn start(tls: bool, auth: bool) -> Etcd {
    let etcd = Etcd::start_with(EtcdSpec {
        tls,
        user: auth.then(|| ("flannel".to_owned(), "s3cret".to_owned())),
        ..EtcdSpec::default()
    })
    .unwrap();
    etcd.put(&format!("{PREFIX}/config"), CONFIG).unwrap();
    etcd
}

/// Connect and read the config; the error if either fails.
async fn read_config(opts: &overlay_agent::subnet::etcd::EtcdOptions) -> Result<u8, EtcdError> {
    let reg = Registry::connect(opts).await?;
    Ok(reg.get_config().await?.expect("config exists").subnet_len)
}

fn assert_permanent(e: &EtcdError, needles: &[&str]) {
    let msg = overlay_agent::subnet::etcd::error_chain(e);
    assert!(!e.is_transient(), "should stop the agent: {msg}");
    assert!(
        needles
            .iter()
            .any(|n| msg.to_ascii_lowercase().contains(&n.to_ascii_lowercase())),
        "{msg:?} names none of {needles:?}"
    );
}

#[tokio::test]
async fn tls_with_client_certificates() {
    let etcd = start(true, false);
    assert!(etcd.endpoints().starts_with("https://"));
    let opts = etcd.options(PREFIX);
    assert_eq!(read_config(&opts).await.unwrap(), 24);
    let reg = Registry::connect(&opts).await.unwrap();
    assert!(reg.list().await.unwrap().entries.is_empty());
}

#[tokio::test]
async fn tls_with_the_wrong_ca_is_a_clear_error() {
    let etcd = start(true, false);
    let mut opts = etcd.options(PREFIX);
    opts.ca_file = Some(etcd.tls().unwrap().other_ca.clone());
    let e = read_config(&opts).await.unwrap_err();
    eprintln!("wrong CA: {e}");
    assert_permanent(&e, &["certificate", "unknownissuer"]);
}

#[tokio::test]
async fn tls_without_a_client_certificate_is_refused() {
    let etcd = start(true, false);
    let mut opts = etcd.options(PREFIX);
    opts.cert_file = None;
    opts.key_file = None;
    // TLS 1.3 reports the missing certificate after the handshake: the
    // request sees the server's alert (configuration: the agent stops), or
    // only the connection closing under it, as in a restart (retried). Which
    // one is a race; either way the message says what is likely wrong.
    for _ in 0..5 {
        let e = read_config(&opts).await.unwrap_err();
        eprintln!("no client cert: {e} ({:?})", e.failure());
        assert!(e.to_string().contains("--etcd-certfile"), "{e}");
        if e.to_string().contains("BadCertificate") {
            assert!(!e.is_transient(), "{e}");
        }
    }
}

#[tokio::test]
async fn tls_files_without_pem_name_the_flag_before_connecting() {
    let etcd = start(true, false);
    let tls = etcd.tls().unwrap();
    // A certificate where the key belongs, and the other way round.
    let mut opts = etcd.options(PREFIX);
    opts.key_file = Some(tls.client_cert.clone());
    let e = Registry::connect(&opts).await.err().expect("a cert as key");
    assert!(
        matches!(
            e,
            EtcdError::Pem {
                flag: "--etcd-keyfile",
                ..
            }
        ),
        "{e}"
    );
    assert!(!e.is_transient());
    assert!(
        e.to_string()
            .contains(&tls.client_cert.display().to_string()),
        "{e}"
    );
    let mut opts = etcd.options(PREFIX);
    opts.ca_file = Some(tls.client_key.clone());
    let e = Registry::connect(&opts).await.err().expect("a key as CA");
    assert!(
        matches!(
            e,
            EtcdError::Pem {
                flag: "--etcd-cafile",
                ..
            }
        ),
        "{e}"
    );
}

#[tokio::test]
async fn tls_files_that_do_not_exist_name_the_flag() {
    let etcd = start(true, false);
    let mut opts = etcd.options(PREFIX);
    opts.key_file = Some("/nonexistent/client.key".into());
    let e = read_config(&opts).await.unwrap_err();
    assert!(e.to_string().contains("--etcd-keyfile"), "{e}");
    assert!(e.to_string().contains("/nonexistent/client.key"), "{e}");
    assert!(!e.is_transient());
}

#[tokio::test]
async fn username_and_password() {
    let etcd = start(false, true);
    assert_eq!(read_config(&etcd.options(PREFIX)).await.unwrap(), 24);
}

#[tokio::test]
async fn wrong_password_is_a_clear_error() {
    let etcd = start(false, true);
    let mut opts = etcd.options(PREFIX);
    opts.password = Some("wrong".into());
    let e = read_config(&opts).await.unwrap_err();
    eprintln!("wrong password: {e}");
    assert_permanent(&e, &["authentication failed"]);
}

#[tokio::test]
async fn no_credentials_on_an_auth_enabled_etcd_is_a_clear_error() {
    let etcd = start(false, true);
    let mut opts = etcd.options(PREFIX);
    opts.username = None;
    opts.password = None;
    let e = read_config(&opts).await.unwrap_err();
    eprintln!("no credentials: {e}");
    assert_permanent(&e, &["user name is empty", "permission denied"]);
}

#[tokio::test]
async fn a_change_of_users_under_a_running_client_is_not_fatal() {
    let etcd = Etcd::start_with(EtcdSpec {
        user: Some(("flannel".to_owned(), "s3cret".to_owned())),
        jwt: true,
        ..EtcdSpec::default()
    })
    .unwrap();
    etcd.put(&format!("{PREFIX}/config"), CONFIG).unwrap();
    let reg = Registry::connect(&etcd.options(PREFIX)).await.unwrap();
    assert!(reg.get_config().await.unwrap().is_some());
    // A new user moves the auth store's revision past the one in our
    // token: etcd refuses it (INVALID_ARGUMENT, as it does a wrong
    // password) until we log in again, which the registry does once.
    etcd.etcdctl(&["user", "add", "someone-else:pw"]).unwrap();
    let again = reg.get_config().await;
    assert!(again.is_ok(), "after a change of users: {:?}", again.err());
    // Logging in again does not hide a permission really taken away.
    etcd.etcdctl(&["role", "revoke-permission", "overlay", "--prefix=true", "/"])
        .unwrap();
    let e = reg.get_config().await.unwrap_err();
    assert_permanent(&e, &["permission denied"]);
}

#[tokio::test]
async fn tls_and_auth_together() {
    let etcd = start(true, true);
    assert_eq!(read_config(&etcd.options(PREFIX)).await.unwrap(), 24);
}

#[tokio::test]
async fn expired_auth_token_is_renewed() {
    // Tokens that expire after one idle second.
    let etcd = Etcd::start_with(EtcdSpec {
        user: Some(("flannel".to_owned(), "s3cret".to_owned())),
        extra_args: vec!["--auth-token-ttl=1".into()],
        ..EtcdSpec::default()
    })
    .unwrap();
    etcd.put(&format!("{PREFIX}/config"), CONFIG).unwrap();
    let reg = Registry::connect(&etcd.options(PREFIX)).await.unwrap();
    assert!(reg.get_config().await.unwrap().is_some());
    tokio::time::sleep(std::time::Duration::from_secs(3)).await;
    let again = reg.get_config().await;
    assert!(again.is_ok(), "after the token expired: {:?}", again.err());
    assert!(reg.list().await.is_ok());
}

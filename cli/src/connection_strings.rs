//! Where a command takes its connection strings from: `--connection-string`
//! (or `connect`'s and `forward`'s argument), `--connection-string-file
//! PATH` (`-`: standard input), or the environment variable
//! `HYBRIDLINK_CONNECTION_STRING` when neither is given.
//!
//! A connection string holds a key, and a command line is readable by every
//! user of the machine (`ps`, `/proc/PID/cmdline`) and lands in shell
//! history; a file of mode 0600, a pipe or the environment do not. The file
//! has the format of the agent's `agent.conf`: one string a line, blank
//! lines and `#` comments skipped.

use std::io::Read;
use std::path::Path;

use proto::connection_string::ConnectionString;
use proto::name::{Endpoint, HcName};

/// The environment variable that may hold connection strings (several
/// separated by newlines).
pub const ENV: &str = "HYBRIDLINK_CONNECTION_STRING";

/// A mistake in how the command was called: the binary exits with 2, as for
/// any other usage error.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct UsageError(pub String);

/// The strings in `path`, or on standard input for `-`.
pub fn read(path: &Path) -> anyhow::Result<Vec<ConnectionString>> {
    if path == Path::new("-") {
        let mut text = String::new();
        std::io::stdin()
            .read_to_string(&mut text)
            .map_err(|e| anyhow::anyhow!("reading connection strings from standard input: {e}"))?;
        return parse(&text, Path::new("standard input"));
    }
    let strings = agent::strings_file::read(path).map_err(|e| match e {
        e @ agent::strings_file::StringsFileError::Read { .. } => anyhow::Error::new(e),
        e => UsageError(e.to_string()).into(),
    })?;
    if strings.is_empty() {
        return Err(UsageError(format!(
            "{} holds no connection string (one a line; `hybridlink hc keys NAME` prints them)",
            path.display()
        ))
        .into());
    }
    Ok(strings)
}

fn parse(text: &str, source: &Path) -> anyhow::Result<Vec<ConnectionString>> {
    let strings =
        agent::strings_file::parse_text(text, source).map_err(|e| UsageError(e.to_string()))?;
    if strings.is_empty() {
        return Err(UsageError(format!(
            "{} holds no connection string (one a line; `hybridlink hc keys NAME` prints them)",
            source.display()
        ))
        .into());
    }
    Ok(strings)
}

/// The strings a command was given: those on its command line and in
/// `file`; if neither was used, those in `env` (the value of [`ENV`]).
/// None at all is a usage error that says where they may come from.
pub fn gather(
    given: Vec<ConnectionString>,
    file: Option<&Path>,
    env: Option<String>,
) -> anyhow::Result<Vec<ConnectionString>> {
    let mut strings = given;
    if let Some(path) = file {
        strings.extend(read(path)?);
    }
    if strings.is_empty()
        && let Some(text) = env.filter(|t| !t.trim().is_empty())
    {
        strings = parse(&text, Path::new(ENV))?;
    }
    if strings.is_empty() {
        return Err(UsageError(format!(
            "no connection string: give --connection-string-file PATH (- reads standard input) or set {ENV}; --connection-string also works, but other users of this machine can read a command line"
        ))
        .into());
    }
    Ok(strings)
}

/// Like [`gather`], for a command that takes exactly one string.
pub fn gather_one(
    given: Option<ConnectionString>,
    file: Option<&Path>,
    env: Option<String>,
) -> anyhow::Result<ConnectionString> {
    let mut strings = gather(given.into_iter().collect(), file, env)?;
    if strings.len() > 1 {
        return Err(UsageError(format!(
            "{} connection strings given; this command takes one",
            strings.len()
        ))
        .into());
    }
    // `gather` returns at least one.
    strings
        .pop()
        .ok_or_else(|| UsageError("no connection string".into()).into())
}

/// The value of [`ENV`], if set.
pub fn from_env() -> Option<String> {
    std::env::var(ENV).ok()
}

/// `--endpoint [NAME=]HOST:PORT`.
pub fn parse_named_endpoint(text: &str) -> Result<(Option<HcName>, Endpoint), String> {
    let (name, endpoint) = match text.split_once('=') {
        Some((name, endpoint)) => (
            Some(name.parse::<HcName>().map_err(|e| e.to_string())?),
            endpoint,
        ),
        None => (None, text),
    };
    let endpoint = endpoint.parse::<Endpoint>().map_err(|e| e.to_string())?;
    Ok((name, endpoint))
}

/// The endpoint of each string served over Azure Relay's protocol: named
/// ones as named, a bare one for the only such string.
pub fn azure_endpoints(
    strings: &[ConnectionString],
    given: Vec<(Option<HcName>, Endpoint)>,
) -> anyhow::Result<std::collections::BTreeMap<HcName, Endpoint>> {
    let azure: Vec<&HcName> = strings
        .iter()
        .filter(|cs| cs.cert_sha256.is_none())
        .map(|cs| &cs.hc)
        .collect();
    let mut out = std::collections::BTreeMap::new();
    for (name, endpoint) in given {
        let name = match name {
            Some(name) => name,
            None => match azure.as_slice() {
                [only] => (*only).clone(),
                [] => anyhow::bail!(
                    "--endpoint {endpoint}: no connection string goes over Azure Relay's protocol (those without CertificateSha256); a hybridlink relay names the endpoint itself"
                ),
                _ => anyhow::bail!(
                    "--endpoint {endpoint}: several hybrid connections go over Azure Relay's protocol; name one: --endpoint NAME={endpoint}"
                ),
            },
        };
        if !azure.contains(&&name) {
            anyhow::bail!(
                "--endpoint {name}={endpoint}: {name} has no connection string here that goes over Azure Relay's protocol"
            );
        }
        out.insert(name, endpoint);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cs(name: &str) -> String {
        format!(
            "Endpoint=sb://relay.test:9443/;SharedAccessKeyName=send;SharedAccessKey=a2V5;EntityPath={name};CertificateSha256={}",
            "ab".repeat(32)
        )
    }

    fn usage(err: &anyhow::Error) -> bool {
        err.downcast_ref::<UsageError>().is_some()
    }

    #[test]
    fn flags_and_file_add_up_and_the_environment_is_the_fallback() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("send.cs");
        std::fs::write(&file, format!("# payroll\n{}\n\n{}\n", cs("a"), cs("b"))).unwrap();
        let given: ConnectionString = cs("c").parse().unwrap();
        let names = |v: Vec<ConnectionString>| -> Vec<String> {
            v.into_iter().map(|c| c.hc.to_string()).collect()
        };
        let all = gather(vec![given.clone()], Some(&file), Some(cs("env"))).unwrap();
        assert_eq!(names(all), ["c", "a", "b"]);
        // The environment only when nothing else was given.
        assert_eq!(
            names(gather(vec![], None, Some(cs("env"))).unwrap()),
            ["env"]
        );
        let two = format!("{}\n{}", cs("x"), cs("y"));
        assert_eq!(
            names(gather(vec![], None, Some(two.clone())).unwrap()),
            ["x", "y"]
        );

        assert_eq!(
            gather_one(Some(given), None, None).unwrap().hc.as_str(),
            "c"
        );
        let err = gather_one(None, Some(&file), None).unwrap_err();
        assert!(usage(&err));
        assert_eq!(
            err.to_string(),
            "2 connection strings given; this command takes one"
        );
        let err = gather_one(None, None, Some(two)).unwrap_err();
        assert!(err.to_string().starts_with("2 connection strings"), "{err}");
    }

    #[test]
    fn missing_empty_unreadable_and_invalid_are_clear() {
        let dir = tempfile::tempdir().unwrap();
        let err = gather(vec![], None, Some("  \n".into())).unwrap_err();
        assert!(usage(&err));
        assert!(
            err.to_string()
                .starts_with("no connection string: give --connection-string-file PATH"),
            "{err}"
        );

        let missing = dir.path().join("missing.cs");
        let err = gather(vec![], Some(&missing), None).unwrap_err();
        assert!(!usage(&err), "an unreadable file is not a usage error");
        assert!(
            err.to_string().starts_with(&format!(
                "reading connection strings from {}",
                missing.display()
            )),
            "{err}"
        );

        let empty = dir.path().join("empty.cs");
        std::fs::write(&empty, "# nothing yet\n").unwrap();
        let err = gather(vec![], Some(&empty), None).unwrap_err();
        assert!(usage(&err));
        assert!(
            err.to_string().contains("holds no connection string"),
            "{err}"
        );

        let bad = dir.path().join("bad.cs");
        std::fs::write(&bad, format!("{}\nEndpoint=sb://x/;oops\n", cs("a"))).unwrap();
        let err = gather(vec![], Some(&bad), None).unwrap_err();
        assert!(usage(&err));
        assert!(
            err.to_string()
                .starts_with(&format!("in {}: line 2: ", bad.display())),
            "{err}"
        );
        let err = gather(vec![], None, Some("not a string".into())).unwrap_err();
        assert!(
            err.to_string()
                .starts_with("in HYBRIDLINK_CONNECTION_STRING: line 1: "),
            "{err}"
        );
    }
}

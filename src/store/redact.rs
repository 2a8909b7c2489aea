//! Redis URLs as logs and errors show them: every login hidden, whatever the URL's form,
//! valid or not.

use super::url::split_urls;

/// One URL, or several separated by commas (Cluster seeds), with every login hidden:
/// `scheme://user:secret@host` → `scheme://user:***@host`, `scheme://secret@host` (a
/// user alone, which some clients read as a password) → `scheme://***@host`, and a
/// `pass=`/`password=` query parameter (`…?pass=secret`, as some clients' Unix-socket URLs
/// have; kvshelf's own forms never do) → `pass=***`.
///
/// It does not parse: it must hide the password of a URL that does not parse either (a
/// `/` or `?` left unencoded in a password). Everything up to the last `@` before the
/// query is a login, so a malformed URL is over-redacted, never under-redacted.
pub fn redact_url(url: &str) -> String {
    split_urls(url)
        .iter()
        .map(|u| redact_one(u))
        .collect::<Vec<_>>()
        .join(",")
}

fn redact_one(url: &str) -> String {
    let (scheme, rest) = match url.split_once("://") {
        Some((scheme, rest)) => (Some(scheme), rest),
        None => (None, url),
    };
    // The last `@` anywhere: a `?` or `/` left unencoded in a password comes before it.
    let (login, tail) = match rest.rsplit_once('@') {
        Some((userinfo, tail)) => (Some(userinfo), tail),
        None => (None, rest),
    };
    let tail = match tail.split_once('?') {
        Some((tail, query)) => format!("{tail}?{}", redact_query(query)),
        None => tail.to_owned(),
    };
    let login = match login {
        // A user name (before the first `:`, if nothing in it could be a path or query) is
        // kept: operators need it to tell two logins apart, and ACL user names are not
        // secrets. A user alone is hidden: some clients read it as a password.
        Some(userinfo) => match userinfo.split_once(':') {
            Some((user, _)) if !user.contains(['/', '?', '#']) => format!("{user}:***@"),
            _ => "***@".to_owned(),
        },
        None => String::new(),
    };
    match scheme {
        Some(scheme) => format!("{scheme}://{login}{tail}"),
        None => format!("{login}{tail}"),
    }
}

/// `db=1&pass=secret` → `db=1&pass=***` (some clients take the password in the query).
fn redact_query(query: &str) -> String {
    query
        .split('&')
        .map(|pair| match pair.split_once('=') {
            Some((k @ ("pass" | "password"), _)) => format!("{k}=***"),
            _ => pair.to_owned(),
        })
        .collect::<Vec<_>>()
        .join("&")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::StoreConfig;

    #[test]
    fn urls_are_redacted_whatever_their_form() {
        for (url, shown) in [
            ("redis://h:1", "redis://h:1"),
            ("redis://kv:s3cret@h:1/2", "redis://kv:***@h:1/2"),
            ("redis://:s3cret@h", "redis://:***@h"),
            ("redis://s3cret@h", "redis://***@h"),
            ("redis://kv:s3cr/et@h:1", "redis://kv:***@h:1"),
            ("redis://kv:s3cr?et@h:1", "redis://kv:***@h:1"),
            ("redis://kv:a@b@h", "redis://kv:***@h"),
            (
                "redis://kv:s3cr,et@a:1,redis://kv:s3cr,et@b:2",
                "redis://kv:***@a:1,redis://kv:***@b:2",
            ),
            (
                "redis+sentinel://kv:s3cr,et@s1,s2:3/m/1",
                "redis+sentinel://kv:***@s1,s2:3/m/1",
            ),
            ("valkey://kv:s3cret@h", "valkey://kv:***@h"),
            ("redis://h/0?pass=s3cret&db=1", "redis://h/0?pass=***&db=1"),
            (
                "unix:///s.sock?password=s3cret",
                "unix:///s.sock?password=***",
            ),
        ] {
            assert_eq!(redact_url(url), shown, "{url}");
        }
    }

    #[test]
    fn urls_are_redacted() {
        assert_eq!(
            redact_url("redis://127.0.0.1:6379"),
            "redis://127.0.0.1:6379"
        );
        assert_eq!(
            redact_url("rediss://kv:s3cret@redis.internal:6380/0"),
            "rediss://kv:***@redis.internal:6380/0"
        );
        assert_eq!(redact_url("redis://:pw@h/1"), "redis://:***@h/1");
        assert_eq!(
            redact_url("redis+unix:///run/redis.sock?db=2&pass=hunter2&user=kv"),
            "redis+unix:///run/redis.sock?db=2&pass=***&user=kv"
        );
        assert_eq!(
            redact_url("unix:///run/redis.sock?pass=hunter2"),
            "unix:///run/redis.sock?pass=***"
        );
        let cfg = StoreConfig {
            url: "redis://u:hunter2@h".into(),
            ..Default::default()
        };
        assert!(!format!("{cfg:?}").contains("hunter2"));
    }
}

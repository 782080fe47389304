//! Remote URLs compared by what they name, not how they are spelled.

use crate::PushError;

/// The canonical form of an HTTP(S) remote URL: `scheme://host:port/path`
/// with the scheme and host lowercased, the port explicit, and the user
/// info, a trailing `/` and a trailing `.git` dropped. Git servers answer
/// `repo` and `repo.git` alike, so both name one remote.
pub fn normalize(url: &str) -> Result<String, PushError> {
    let bad = |why: &str| PushError::Refused(format!("remote URL {url:?}: {why}"));
    let (scheme, rest) = url
        .split_once("://")
        .ok_or_else(|| bad("only http:// and https:// remotes are brokered"))?;
    let scheme = scheme.to_ascii_lowercase();
    let default_port = match scheme.as_str() {
        "https" => 443,
        "http" => 80,
        _ => return Err(bad("only http:// and https:// remotes are brokered")),
    };
    if rest.contains(['?', '#']) || rest.bytes().any(|b| b <= 0x20 || b == 0x7f) {
        return Err(bad("a query, fragment, space or control character"));
    }
    let (authority, path) = rest.split_once('/').unwrap_or((rest, ""));
    let hostport = authority.rsplit_once('@').map_or(authority, |(_, h)| h);
    let (host, port) = if let Some(v6) = hostport.strip_prefix('[') {
        let (h, after) = v6.split_once(']').ok_or_else(|| bad("unclosed `[`"))?;
        let port = match after.strip_prefix(':') {
            Some(p) => Some(p),
            None if after.is_empty() => None,
            None => return Err(bad("junk after the address")),
        };
        (format!("[{}]", h.to_ascii_lowercase()), port)
    } else {
        match hostport.rsplit_once(':') {
            Some((h, p)) => (h.to_ascii_lowercase(), Some(p)),
            None => (hostport.to_ascii_lowercase(), None),
        }
    };
    let host = host.trim_end_matches('.').to_string();
    if host.is_empty() {
        return Err(bad("no host"));
    }
    let port: u16 = match port {
        None | Some("") => default_port,
        Some(p) => p.parse().map_err(|_| bad("the port is not a number"))?,
    };
    let mut segments = Vec::new();
    for s in path.split('/') {
        match s {
            "" => {}
            "." | ".." => return Err(bad("`.` or `..` in the path")),
            s => segments.push(s),
        }
    }
    let mut path = segments.join("/");
    if let Some(p) = path.strip_suffix(".git") {
        path = p.trim_end_matches('/').to_string();
    }
    Ok(format!("{scheme}://{host}:{port}/{path}"))
}

/// Decodes `%XX` escapes (servers decode them before routing, so a
/// request for `git%2Dreceive-pack` reaches receive-pack).
fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        let hex = |c: u8| (c as char).to_digit(16);
        if b[i] == b'%'
            && i + 2 < b.len()
            && let (Some(h), Some(l)) = (hex(b[i + 1]), hex(b[i + 2]))
        {
            out.push((h * 16 + l) as u8);
            i += 3;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// The repository path of git's fetch request (`POST /org/repo.git/git-upload-pack`).
pub fn upload_pack_repo(path: &str) -> Option<String> {
    let p = judged(path);
    let lower = p.to_ascii_lowercase();
    lower
        .strip_suffix("/git-upload-pack")
        .map(|s| p[..s.len()].to_string())
}

/// The path as servers route it: `%XX` decoded, `;params` dropped from
/// each segment (servlet containers do), empty and `.` segments gone.
fn judged(path: &str) -> String {
    percent_decode(path)
        .split('/')
        .map(|seg| seg.split(';').next().unwrap_or(""))
        .filter(|seg| !seg.is_empty() && *seg != ".")
        .fold(String::new(), |mut acc, seg| {
            acc.push('/');
            acc.push_str(seg);
            acc
        })
}

/// The repository path of a smart-HTTP push request (`/org/repo.git` for
/// `GET /org/repo.git/info/refs?service=git-receive-pack` and
/// `POST /org/repo.git/git-receive-pack`), or `None` for anything else.
pub fn receive_pack_repo(path: &str, query: Option<&str>) -> Option<String> {
    let decoded = judged(path);
    let trimmed = decoded.as_str();
    let lower = trimmed.to_ascii_lowercase();
    if let Some(n) = lower.strip_suffix("/git-receive-pack").map(str::len) {
        return Some(trimmed[..n].to_string());
    }
    if let Some(n) = lower.strip_suffix("/info/refs").map(str::len) {
        let push = query.is_some_and(|q| {
            q.split('&').any(|kv| {
                let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
                percent_decode(k).eq_ignore_ascii_case("service")
                    && percent_decode(v).eq_ignore_ascii_case("git-receive-pack")
            })
        });
        if push {
            return Some(trimmed[..n].to_string());
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spellings_of_one_remote_agree() {
        let want = "https://git.example.com:443/org/repo";
        for u in [
            "https://git.example.com/org/repo.git",
            "HTTPS://Git.Example.COM:443/org/repo/",
            "https://x-access-token:abc@git.example.com/org//repo.git/",
            "https://git.example.com./org/repo",
        ] {
            assert_eq!(normalize(u).ok().as_deref(), Some(want), "{u}");
        }
        assert_eq!(
            normalize("http://[::1]:8080/r.git").ok().as_deref(),
            Some("http://[::1]:8080/r")
        );
        assert_ne!(
            normalize("https://git.example.com/org/other")
                .ok()
                .as_deref(),
            Some(want)
        );
        for bad in [
            "git@github.com:org/repo.git",
            "ssh://git@host/repo",
            "https://host/../x",
            "https://host:99999/x",
            "https:///x",
            "https://host/x?y",
        ] {
            assert!(normalize(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn push_requests_are_recognised_however_spelled() {
        let r = |p: &str, q: Option<&str>| receive_pack_repo(p, q);
        assert_eq!(
            r("/o/r.git/git-receive-pack", None).as_deref(),
            Some("/o/r.git")
        );
        assert_eq!(
            r("/o/r.git/git%2Dreceive-pack", None).as_deref(),
            Some("/o/r.git")
        );
        assert_eq!(r("/o/r/GIT-RECEIVE-PACK/", None).as_deref(), Some("/o/r"));
        assert_eq!(
            r("/o/r.git/info/refs", Some("service=git-receive-pack")).as_deref(),
            Some("/o/r.git")
        );
        assert_eq!(
            r("/o/r.git/info/refs", Some("x=1&service=git%2dreceive-pack")).as_deref(),
            Some("/o/r.git")
        );
        assert_eq!(
            r("/o/r.git/info/refs", Some("service=git-upload-pack")),
            None
        );
        assert_eq!(r("/o/r.git/git-upload-pack", None), None);
        assert_eq!(
            r("/a/proj/git-receive-pack;x=1", None).as_deref(),
            Some("/a/proj")
        );
        assert_eq!(
            r("/a/proj/git-receive-pack;", None).as_deref(),
            Some("/a/proj")
        );
        assert_eq!(
            r("/a//proj/./git-receive-pack/.", None).as_deref(),
            Some("/a/proj")
        );
        assert_eq!(
            r(
                "/a/proj/info/refs;jsessionid=1",
                Some("service=git-receive-pack")
            )
            .as_deref(),
            Some("/a/proj")
        );
    }
}

//! `WWW-Authenticate` challenges (RFC 7235) as registries send them.

use std::collections::BTreeMap;

/// One challenge: a scheme (lowercased) and its parameters (keys lowercased).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Challenge {
    pub(crate) scheme: String,
    pub(crate) params: BTreeMap<String, String>,
}

/// Parses a `WWW-Authenticate` value, which may hold several challenges:
/// `Bearer realm="https://auth.docker.io/token",service="registry.docker.io",scope="repository:a:pull,push"`.
/// Quoted values may contain commas and `\`-escapes; unquoted values end at
/// a comma. Malformed input yields what could be read.
pub(crate) fn parse_challenges(header: &str) -> Vec<Challenge> {
    let chars: Vec<char> = header.chars().collect();
    let mut i = 0;
    let mut out: Vec<Challenge> = Vec::new();
    let is_sep = |c: char| c.is_whitespace() || c == ',';
    while i < chars.len() {
        while i < chars.len() && is_sep(chars[i]) {
            i += 1;
        }
        let start = i;
        while i < chars.len() && !is_sep(chars[i]) && chars[i] != '=' {
            i += 1;
        }
        let token: String = chars[start..i].iter().collect();
        if token.is_empty() {
            // A stray '=': skip it.
            i += 1;
            continue;
        }
        let mut j = i;
        while j < chars.len() && chars[j].is_whitespace() {
            j += 1;
        }
        if j < chars.len() && chars[j] == '=' {
            // A parameter of the current challenge.
            i = j + 1;
            while i < chars.len() && chars[i].is_whitespace() {
                i += 1;
            }
            let mut value = String::new();
            if i < chars.len() && chars[i] == '"' {
                i += 1;
                while i < chars.len() && chars[i] != '"' {
                    if chars[i] == '\\' && i + 1 < chars.len() {
                        i += 1;
                    }
                    value.push(chars[i]);
                    i += 1;
                }
                i += 1; // closing quote
            } else {
                while i < chars.len() && chars[i] != ',' {
                    value.push(chars[i]);
                    i += 1;
                }
                value = value.trim().to_owned();
            }
            if let Some(c) = out.last_mut() {
                c.params.insert(token.to_ascii_lowercase(), value);
            }
        } else {
            out.push(Challenge {
                scheme: token.to_ascii_lowercase(),
                params: BTreeMap::new(),
            });
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params(c: &Challenge) -> Vec<(&str, &str)> {
        c.params
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect()
    }

    #[test]
    fn parses_docker_hub_bearer() {
        let c = parse_challenges(
            r#"Bearer realm="https://auth.docker.io/token",service="registry.docker.io",scope="repository:library/busybox:pull,push""#,
        );
        assert_eq!(c.len(), 1);
        assert_eq!(c[0].scheme, "bearer");
        assert_eq!(
            params(&c[0]),
            vec![
                ("realm", "https://auth.docker.io/token"),
                ("scope", "repository:library/busybox:pull,push"),
                ("service", "registry.docker.io"),
            ]
        );
    }

    #[test]
    fn parses_basic_unquoted_escaped_and_several() {
        let c = parse_challenges(r#"Basic realm="Registry Realm""#);
        assert_eq!(c[0].scheme, "basic");
        assert_eq!(params(&c[0]), vec![("realm", "Registry Realm")]);

        let c = parse_challenges(
            r#"BEARER Realm = http://127.0.0.1:1/token , Service=reg, error="insufficient_scope", x="a \"q\" \\ b""#,
        );
        assert_eq!(c[0].scheme, "bearer");
        assert_eq!(
            params(&c[0]),
            vec![
                ("error", "insufficient_scope"),
                ("realm", "http://127.0.0.1:1/token"),
                ("service", "reg"),
                ("x", r#"a "q" \ b"#),
            ]
        );

        let c = parse_challenges(r#"Basic realm="r", Bearer realm="t",service="s""#);
        assert_eq!(c.len(), 2);
        assert_eq!(
            (c[0].scheme.as_str(), c[1].scheme.as_str()),
            ("basic", "bearer")
        );
        assert_eq!(params(&c[1]), vec![("realm", "t"), ("service", "s")]);

        assert!(parse_challenges("").is_empty());
        // Garbage does not panic.
        let _ = parse_challenges(r#"="x", Bearer realm="unterminated"#);
        let _ = parse_challenges("Bearer realm=");
    }
}

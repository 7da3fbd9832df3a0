//! Word splitting, quote removal and variable expansion the way Docker does
//! them for ENV, ARG, LABEL, COPY, ADD, WORKDIR, USER, EXPOSE and FROM.
//!
//! RUN, CMD and ENTRYPOINT are never expanded here: their shell does it.

use crate::error::ParseErrorKind;

/// Looks a variable up: `Some` when it is set (possibly to "").
pub(crate) trait Lookup {
    fn get(&self, name: &str) -> Option<&str>;
}

/// Splits on whitespace outside quotes, keeping quotes and escapes in the
/// words so that [`expand`] can process each word afterwards.
pub(crate) fn split_raw(text: &str, escape: char) -> Result<Vec<String>, ParseErrorKind> {
    let mut words = Vec::new();
    let mut cur = String::new();
    let mut quote: Option<char> = None;
    // Open `${` braces: whitespace inside `${VAR:-a b}` is part of the word.
    let mut braces = 0usize;
    let mut chars = text.chars().peekable();
    while let Some(c) = chars.next() {
        if c == escape && quote != Some('\'') {
            cur.push(c);
            if let Some(n) = chars.next() {
                cur.push(n);
            }
            continue;
        }
        if quote != Some('\'') {
            if c == '$' && chars.peek() == Some(&'{') {
                braces += 1;
                cur.push(c);
                cur.extend(chars.next());
                continue;
            }
            if c == '}' && braces > 0 {
                braces -= 1;
                cur.push(c);
                continue;
            }
        }
        if braces > 0 && quote.is_none() {
            cur.push(c);
            continue;
        }
        match quote {
            Some(q) => {
                if c == q {
                    quote = None;
                }
                cur.push(c);
            }
            None if c.is_whitespace() => {
                if !cur.is_empty() {
                    words.push(std::mem::take(&mut cur));
                }
            }
            None => {
                if c == '\'' || c == '"' {
                    quote = Some(c);
                }
                cur.push(c);
            }
        }
    }
    if let Some(quote) = quote {
        return Err(ParseErrorKind::UnterminatedQuote { quote });
    }
    if !cur.is_empty() {
        words.push(cur);
    }
    Ok(words)
}

/// Expands one word: `$VAR`, `${VAR}`, `${VAR:-default}`, `${VAR-default}`,
/// `${VAR:+alt}`, `${VAR+alt}`, `${VAR:?msg}`, `${VAR?msg}`; removes quotes;
/// the escape character makes the next character literal (`\$` is a `$`).
/// Single quotes are literal; in double quotes the escape only escapes `"`,
/// `$` and itself. Unset variables expand to nothing.
pub(crate) fn expand(
    word: &str,
    escape: char,
    vars: &dyn Lookup,
) -> Result<String, ParseErrorKind> {
    let chars: Vec<char> = word.chars().collect();
    let mut out = String::new();
    let mut k = 0;
    while k < chars.len() {
        let c = chars[k];
        if c == escape {
            match chars.get(k + 1) {
                Some(n) => out.push(*n),
                None => out.push(c),
            }
            k += 2;
        } else if c == '\'' {
            let end = find(&chars, k + 1, '\'')
                .ok_or(ParseErrorKind::UnterminatedQuote { quote: '\'' })?;
            out.extend(&chars[k + 1..end]);
            k = end + 1;
        } else if c == '"' {
            k += 1;
            loop {
                let Some(&d) = chars.get(k) else {
                    return Err(ParseErrorKind::UnterminatedQuote { quote: '"' });
                };
                if d == '"' {
                    k += 1;
                    break;
                }
                if d == escape {
                    match chars.get(k + 1) {
                        Some(&n) if n == '"' || n == '$' || n == escape => {
                            out.push(n);
                            k += 2;
                        }
                        _ => {
                            out.push(d);
                            k += 1;
                        }
                    }
                } else if d == '$' {
                    k = dollar(&chars, k, escape, vars, &mut out)?;
                } else {
                    out.push(d);
                    k += 1;
                }
            }
        } else if c == '$' {
            k = dollar(&chars, k, escape, vars, &mut out)?;
        } else {
            out.push(c);
            k += 1;
        }
    }
    Ok(out)
}

/// Expands variables only, keeping quotes and escapes as written, except
/// that an escaped `$` is a literal `$`: what Docker does to the body of an
/// unquoted COPY heredoc.
pub(crate) fn expand_raw(
    text: &str,
    escape: char,
    vars: &dyn Lookup,
) -> Result<String, ParseErrorKind> {
    let chars: Vec<char> = text.chars().collect();
    let mut out = String::new();
    let mut k = 0;
    while k < chars.len() {
        let c = chars[k];
        if c == escape && chars.get(k + 1) == Some(&'$') {
            out.push('$');
            k += 2;
        } else if c == '$' {
            k = dollar(&chars, k, escape, vars, &mut out)?;
        } else {
            out.push(c);
            k += 1;
        }
    }
    Ok(out)
}

fn find(chars: &[char], from: usize, c: char) -> Option<usize> {
    chars
        .get(from..)?
        .iter()
        .position(|x| *x == c)
        .map(|p| p + from)
}

fn is_name_start(c: char) -> bool {
    c.is_ascii_alphabetic() || c == '_'
}

fn is_name(c: char) -> bool {
    c.is_ascii_alphanumeric() || c == '_'
}

/// Expands the `$...` starting at `chars[k]` into `out`; returns the index
/// after it. A `$` not followed by a name or `{` is literal.
fn dollar(
    chars: &[char],
    k: usize,
    escape: char,
    vars: &dyn Lookup,
    out: &mut String,
) -> Result<usize, ParseErrorKind> {
    match chars.get(k + 1) {
        Some('{') => {
            // Find the matching `}`, allowing nested `${...}` in the word.
            let mut depth = 0usize;
            let mut j = k + 2;
            let end = loop {
                match chars.get(j) {
                    None => {
                        return Err(ParseErrorKind::BadSubstitution {
                            text: chars[k..].iter().collect(),
                        });
                    }
                    Some(c) if *c == escape => j += 2,
                    Some('{') => {
                        depth += 1;
                        j += 1;
                    }
                    Some('}') if depth == 0 => break j,
                    Some('}') => {
                        depth -= 1;
                        j += 1;
                    }
                    Some(_) => j += 1,
                }
            };
            let text: String = chars[k..=end].iter().collect();
            let inner = &chars[k + 2..end];
            let name_len = inner.iter().take_while(|c| is_name(**c)).count();
            if name_len == 0 || !is_name_start(inner[0]) {
                return Err(ParseErrorKind::BadSubstitution { text });
            }
            let name: String = inner[..name_len].iter().collect();
            let rest = &inner[name_len..];
            let value = vars.get(&name);
            if rest.is_empty() {
                out.push_str(value.unwrap_or(""));
                return Ok(end + 1);
            }
            let (colon, op, word) = match rest {
                [':', op, word @ ..] => (true, *op, word),
                [op, word @ ..] => (false, *op, word),
                [] => return Err(ParseErrorKind::BadSubstitution { text }),
            };
            // With `:`, an empty value counts as unset.
            let set = match value {
                Some(v) => !(colon && v.is_empty()),
                None => false,
            };
            let word: String = word.iter().collect();
            match op {
                '-' if set => out.push_str(value.unwrap_or("")),
                '-' => out.push_str(&expand(&word, escape, vars)?),
                '+' if set => out.push_str(&expand(&word, escape, vars)?),
                '+' => {}
                '?' if set => out.push_str(value.unwrap_or("")),
                '?' => {
                    return Err(ParseErrorKind::RequiredVariable {
                        name,
                        message: expand(&word, escape, vars)?,
                    });
                }
                _ => return Err(ParseErrorKind::BadSubstitution { text }),
            }
            Ok(end + 1)
        }
        Some(c) if is_name_start(*c) => {
            let len = chars[k + 1..].iter().take_while(|c| is_name(**c)).count();
            let name: String = chars[k + 1..k + 1 + len].iter().collect();
            out.push_str(vars.get(&name).unwrap_or(""));
            Ok(k + 1 + len)
        }
        _ => {
            out.push('$');
            Ok(k + 1)
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;

    impl Lookup for BTreeMap<&str, &str> {
        fn get(&self, name: &str) -> Option<&str> {
            BTreeMap::get(self, name).copied()
        }
    }

    fn vars() -> BTreeMap<&'static str, &'static str> {
        BTreeMap::from([("A", "alpha"), ("E", ""), ("P", "/opt/app")])
    }

    fn x(word: &str) -> String {
        expand(word, '\\', &vars()).unwrap()
    }

    #[test]
    fn plain_and_braced_variables() {
        assert_eq!(x("$A"), "alpha");
        assert_eq!(x("${A}_x"), "alpha_x");
        assert_eq!(x("$A_x"), "");
        assert_eq!(x("$P/bin"), "/opt/app/bin");
        assert_eq!(x("$UNSET-z"), "-z");
    }

    #[test]
    fn default_and_alternative_operators() {
        assert_eq!(x("${A:-d}"), "alpha");
        assert_eq!(x("${U:-d}"), "d");
        assert_eq!(x("${E:-d}"), "d");
        assert_eq!(x("${E-d}"), "");
        assert_eq!(x("${U-d}"), "d");
        assert_eq!(x("${A:+alt}"), "alt");
        assert_eq!(x("${E:+alt}"), "");
        assert_eq!(x("${E+alt}"), "alt");
        assert_eq!(x("${U:+alt}"), "");
        assert_eq!(x("${U:-$P/x}"), "/opt/app/x");
        assert_eq!(x("${U:-${A}}"), "alpha");
    }

    #[test]
    fn required_variable_reports_its_message() {
        let e = expand("${U:?set U}", '\\', &vars()).unwrap_err();
        assert_eq!(
            e,
            ParseErrorKind::RequiredVariable {
                name: "U".into(),
                message: "set U".into()
            }
        );
        assert_eq!(x("${A:?x}"), "alpha");
    }

    #[test]
    fn escapes_and_quotes() {
        assert_eq!(x("\\$A"), "$A");
        assert_eq!(x("'$A'"), "$A");
        assert_eq!(x("\"$A b\""), "alpha b");
        assert_eq!(x("\"\\$A \\\" \\n\""), "$A \" \\n");
        assert_eq!(x("a\\ b"), "a b");
        assert_eq!(x("$"), "$");
        assert_eq!(x("$1"), "$1");
        assert_eq!(expand("`$A", '`', &vars()).unwrap(), "$A");
    }

    #[test]
    fn bad_substitutions_are_refused() {
        for w in ["${A", "${}", "${1}", "${A:x}", "${A%x}"] {
            assert!(
                matches!(
                    expand(w, '\\', &vars()),
                    Err(ParseErrorKind::BadSubstitution { .. })
                ),
                "{w}"
            );
        }
        assert!(matches!(
            expand("\"abc", '\\', &vars()),
            Err(ParseErrorKind::UnterminatedQuote { quote: '"' })
        ));
    }

    #[test]
    fn raw_expansion_keeps_quotes_and_escapes() {
        assert_eq!(
            expand_raw("'$A' \"x\" \\n \\$A ${U:-d}\n", '\\', &vars()).unwrap(),
            "'alpha' \"x\" \\n $A d\n"
        );
    }

    #[test]
    fn split_keeps_quoted_spaces() {
        assert_eq!(
            split_raw("a=1  b=\"x y\" c='p q' d\\ e", '\\').unwrap(),
            vec!["a=1", "b=\"x y\"", "c='p q'", "d\\ e"]
        );
        assert_eq!(
            split_raw("a=${X:-p q} b=${Y:+${Z:-1 2}}", '\\').unwrap(),
            vec!["a=${X:-p q}", "b=${Y:+${Z:-1 2}}"]
        );
        assert!(split_raw("a 'b", '\\').is_err());
    }
}

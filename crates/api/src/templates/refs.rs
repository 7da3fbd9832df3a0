//! Template references and their resolution, shared by sandbox create,
//! `fromTemplate` and the registry endpoints.
//!
//! A reference is `[namespace/]name-or-id[:tag]` (CONTRACT 2.3
//! `templateID`), case-insensitive, percent-decoded by the router. Names and
//! ids are `[a-z0-9_-]` (at most 128 characters), tags `[a-z0-9_.-]`, as the
//! reference server checks them. `default` is the tag meant when none is
//! given. A namespace must be the owning team's name; it is ignored for the
//! built-in templates, which belong to no team.

use crate::Api;
use crate::db::templates::{BuildRow, DEFAULT_TAG, TemplateRow};
use crate::error::ApiError;

/// Longest name, id or tag.
pub(crate) const MAX_NAME_LEN: usize = 128;

/// A parsed reference.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct TemplateRef {
    /// Team name the template must belong to.
    pub(crate) namespace: Option<String>,
    /// Template id or name.
    pub(crate) name: String,
    /// `None` means `default`.
    pub(crate) tag: Option<String>,
    /// As the client wrote it, for messages.
    pub(crate) raw: String,
}

fn is_name_char(b: u8) -> bool {
    b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_'
}

/// Whether `s` (already lower-cased) is a valid template name or id.
pub(crate) fn valid_name(s: &str) -> bool {
    !s.is_empty() && s.len() <= MAX_NAME_LEN && s.bytes().all(is_name_char)
}

/// A tag, trimmed and lower-cased, or a 400.
pub(crate) fn parse_tag(raw: &str) -> Result<String, ApiError> {
    let t = raw.trim().to_lowercase();
    let ok =
        !t.is_empty() && t.len() <= MAX_NAME_LEN && t.bytes().all(|b| is_name_char(b) || b == b'.');
    if ok {
        Ok(t)
    } else {
        Err(ApiError::BadRequest(format!(
            "invalid tag '{raw}': use 1 to {MAX_NAME_LEN} lowercase letters, digits, '-', '_' or '.'"
        )))
    }
}

/// Whether `s` has the shape of a UUID (tags must not: build ids are).
fn looks_like_uuid(s: &str) -> bool {
    s.len() == 36
        && s.bytes().enumerate().all(|(i, b)| match i {
            8 | 13 | 18 | 23 => b == b'-',
            _ => b.is_ascii_hexdigit(),
        })
}

/// Tags a client wants to create: each valid and not a UUID; sorted,
/// duplicates dropped.
pub(crate) fn new_tags<'a>(
    raw: impl IntoIterator<Item = &'a str>,
) -> Result<Vec<String>, ApiError> {
    let mut out = Vec::new();
    for r in raw {
        let t = parse_tag(r)?;
        if looks_like_uuid(&t) {
            return Err(ApiError::BadRequest(format!(
                "invalid tag '{r}': a tag cannot be a UUID (build ids are)"
            )));
        }
        out.push(t);
    }
    out.sort();
    out.dedup();
    Ok(out)
}

impl TemplateRef {
    /// Parses `[namespace/]name[:tag]`; `what` names the field in errors.
    pub(crate) fn parse(raw: &str, what: &str) -> Result<TemplateRef, ApiError> {
        let s = raw.trim().to_lowercase();
        let (ident, tag) = match s.split_once(':') {
            Some((i, t)) => (i, Some(parse_tag(t)?)),
            None => (s.as_str(), None),
        };
        let (namespace, name) = match ident.split_once('/') {
            Some((ns, n)) => (Some(ns), n),
            None => (None, ident),
        };
        let bad = |part: &str| {
            ApiError::BadRequest(format!(
                "invalid {what} '{raw}': the {part} must be 1 to {MAX_NAME_LEN} lowercase \
                 letters, digits, '-' or '_' (form: [namespace/]name[:tag])"
            ))
        };
        if let Some(ns) = namespace {
            if !valid_name(ns) {
                return Err(bad("namespace"));
            }
        }
        if !valid_name(name) {
            return Err(bad("name"));
        }
        Ok(TemplateRef {
            namespace: namespace.map(str::to_string),
            name: name.to_string(),
            tag: tag.filter(|t| t != DEFAULT_TAG),
            raw: raw.trim().to_string(),
        })
    }

    /// The tag meant: the given one or `default`.
    pub(crate) fn tag(&self) -> &str {
        self.tag.as_deref().unwrap_or(DEFAULT_TAG)
    }
}

/// Whether `team` owns `t` (built-in templates are owned by nobody).
pub(crate) fn owns(t: &TemplateRow, team: &str) -> bool {
    t.team_id.as_deref() == Some(team)
}

/// 403 unless `team` owns `t`.
pub(crate) fn require_owner(t: &TemplateRow, team: &str, shown: &str) -> Result<(), ApiError> {
    match &t.team_id {
        Some(owner) if owner == team => Ok(()),
        Some(_) => Err(ApiError::Forbidden(format!(
            "template '{shown}' belongs to another team"
        ))),
        None => Err(ApiError::Forbidden(format!(
            "'{shown}' is built into Arca and cannot be changed; build your own template from it instead"
        ))),
    }
}

/// The template a reference names, if `team` may see it: its own, a
/// built-in one, or another team's public one. Another team's private
/// template is a 403 (it exists, CONTRACT 2.1), an unknown one a 404.
pub(crate) async fn find(api: &Api, team: &str, r: &TemplateRef) -> Result<TemplateRow, ApiError> {
    let db = api.db();
    let found = match db.template_by_id(&r.name).await? {
        Some(t) => Some(t),
        None => db.template_by_name(&r.name).await?,
    };
    let not_found = || ApiError::NotFound(format!("template '{}' not found", r.raw));
    let Some(t) = found else {
        return Err(not_found());
    };
    if let (Some(ns), Some(owner)) = (&r.namespace, &t.team_id) {
        let owner_name = db.team_name(owner).await?.unwrap_or_default();
        if owner_name.to_lowercase() != *ns {
            return Err(not_found());
        }
    }
    if t.team_id.is_none() || t.public || owns(&t, team) {
        Ok(t)
    } else {
        Err(ApiError::Forbidden(format!(
            "template '{}' belongs to another team",
            r.raw
        )))
    }
}

/// A template and the build a reference's tag points at.
#[derive(Debug, Clone)]
pub(crate) struct Resolved {
    pub(crate) template: TemplateRow,
    pub(crate) build: BuildRow,
}

/// Resolves a reference to a ready build: 404 for an unknown template or
/// tag, 400 for a template that has no finished build at all.
pub(crate) async fn resolve_build(
    api: &Api,
    team: &str,
    r: &TemplateRef,
) -> Result<Resolved, ApiError> {
    let template = find(api, team, r).await?;
    match api.db().tagged_build(&template.id, r.tag()).await? {
        Some(build) => Ok(Resolved { template, build }),
        None if !api.db().has_ready_build(&template.id).await? => {
            Err(ApiError::BadRequest(format!(
                "template '{}' has no finished build yet; see its build status, or build it again",
                r.raw
            )))
        }
        None => Err(ApiError::NotFound(format!(
            "template '{}' not found: it has no tag '{}'",
            r.raw,
            r.tag()
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::StatusCode;

    fn p(s: &str) -> TemplateRef {
        TemplateRef::parse(s, "templateID").unwrap()
    }

    #[test]
    fn references_parse_into_namespace_name_and_tag() {
        let r = p(" Team/My-App_2:V1.0 ");
        assert_eq!(r.namespace.as_deref(), Some("team"));
        assert_eq!(r.name, "my-app_2");
        assert_eq!(r.tag.as_deref(), Some("v1.0"));
        assert_eq!(r.raw, "Team/My-App_2:V1.0");
        assert_eq!(p("base").tag(), "default");
        assert_eq!(p("base:default").tag, None);
        assert_eq!(p("base:DEFAULT").tag, None);
        for bad in [
            "",
            " ",
            "a b",
            "a.b",
            "/x",
            "x/",
            "a:",
            "a:b c",
            "a/b/c",
            &"x".repeat(129),
        ] {
            let e = TemplateRef::parse(bad, "templateID").unwrap_err();
            assert_eq!(e.status(), StatusCode::BAD_REQUEST, "{bad}");
        }
        assert!(TemplateRef::parse(&"x".repeat(128), "name").is_ok());
    }

    #[test]
    fn new_tags_are_checked_deduplicated_and_never_uuids() {
        assert_eq!(new_tags(["B", "a", "b "]).unwrap(), ["a", "b"]);
        assert!(new_tags(["00000000-0000-4000-8000-000000000000"]).is_err());
        assert!(new_tags(["a/b"]).is_err());
        assert!(new_tags(["v1.2.3-rc_1"]).is_ok());
    }
}

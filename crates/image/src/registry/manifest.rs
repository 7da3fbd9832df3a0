//! Manifests, indexes and image configs (Docker v2 schema 2 and OCI), and
//! choosing a platform from an index.

use std::collections::BTreeMap;
use std::fmt;
use std::str::FromStr;

use serde::Deserialize;

use crate::ImageError;

/// Docker v2 schema 2 image manifest.
pub(crate) const DOCKER_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";
/// Docker manifest list.
pub(crate) const DOCKER_LIST: &str = "application/vnd.docker.distribution.manifest.list.v2+json";
/// OCI image manifest.
pub(crate) const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
/// OCI image index.
pub(crate) const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
/// What we send in `Accept` for manifests.
pub(crate) const MANIFEST_ACCEPT: &str = "application/vnd.oci.image.index.v1+json, \
     application/vnd.docker.distribution.manifest.list.v2+json, \
     application/vnd.oci.image.manifest.v1+json, \
     application/vnd.docker.distribution.manifest.v2+json";

/// Image config media types we accept.
const CONFIG_TYPES: [&str; 2] = [
    "application/vnd.docker.container.image.v1+json",
    "application/vnd.oci.image.config.v1+json",
];

/// Layer media types we accept (compression is detected from the bytes).
const LAYER_TYPES: [&str; 8] = [
    "application/vnd.docker.image.rootfs.diff.tar.gzip",
    "application/vnd.docker.image.rootfs.diff.tar",
    "application/vnd.oci.image.layer.v1.tar",
    "application/vnd.oci.image.layer.v1.tar+gzip",
    "application/vnd.oci.image.layer.v1.tar+zstd",
    "application/vnd.oci.image.layer.nondistributable.v1.tar",
    "application/vnd.oci.image.layer.nondistributable.v1.tar+gzip",
    "application/vnd.oci.image.layer.nondistributable.v1.tar+zstd",
];

/// An operating system / CPU architecture pair, as in OCI indexes.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Platform {
    /// e.g. `linux`.
    pub os: String,
    /// GOARCH-style, e.g. `amd64`, `arm64`.
    pub architecture: String,
    /// e.g. `v8` for arm64, `v7` for arm.
    pub variant: Option<String>,
}

impl Platform {
    /// The platform of this host (`linux/amd64` on x86-64).
    pub fn host() -> Self {
        let (architecture, variant) = match std::env::consts::ARCH {
            "x86_64" => ("amd64", None),
            "aarch64" => ("arm64", Some("v8")),
            "arm" => ("arm", Some("v7")),
            "x86" => ("386", None),
            "powerpc64" => ("ppc64le", None),
            "riscv64" => ("riscv64", None),
            "s390x" => ("s390x", None),
            "loongarch64" => ("loong64", None),
            other => (other, None),
        };
        Self {
            os: "linux".to_owned(),
            architecture: architecture.to_owned(),
            variant: variant.map(str::to_owned),
        }
    }

    /// Parses `os/architecture[/variant]`.
    pub fn parse(s: &str) -> Result<Self, ImageError> {
        let mut parts = s.split('/');
        let invalid = || ImageError::InvalidPlatform {
            platform: s.to_owned(),
        };
        let os = parts.next().filter(|p| !p.is_empty()).ok_or_else(invalid)?;
        let architecture = parts.next().filter(|p| !p.is_empty()).ok_or_else(invalid)?;
        let variant = parts.next().map(str::to_owned);
        if parts.next().is_some() || variant.as_deref() == Some("") {
            return Err(invalid());
        }
        Ok(Self {
            os: os.to_owned(),
            architecture: architecture.to_owned(),
            variant,
        })
    }

    /// Variant with the architecture's default filled in (arm64: v8, arm: v7).
    fn normalized_variant(&self) -> Option<&str> {
        match (self.architecture.as_str(), self.variant.as_deref()) {
            ("arm64", None) => Some("v8"),
            ("arm", None) => Some("v7"),
            ("amd64", Some("v1")) => None,
            (_, v) => v,
        }
    }
}

impl Default for Platform {
    fn default() -> Self {
        Self::host()
    }
}

impl fmt::Display for Platform {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.os, self.architecture)?;
        if let Some(v) = &self.variant {
            write!(f, "/{v}")?;
        }
        Ok(())
    }
}

impl FromStr for Platform {
    type Err = ImageError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::parse(s)
    }
}

/// A content descriptor.
#[derive(Debug, Clone, Deserialize)]
pub(crate) struct Descriptor {
    #[serde(rename = "mediaType", default)]
    pub(crate) media_type: String,
    pub(crate) digest: String,
    #[serde(default)]
    pub(crate) size: u64,
    #[serde(default)]
    pub(crate) platform: Option<PlatformJson>,
}

/// `platform` of an index entry.
#[derive(Debug, Clone, Deserialize)]
pub(crate) struct PlatformJson {
    #[serde(default)]
    pub(crate) architecture: String,
    #[serde(default)]
    pub(crate) os: String,
    #[serde(default)]
    pub(crate) variant: Option<String>,
}

impl PlatformJson {
    fn to_platform(&self) -> Platform {
        Platform {
            os: self.os.clone(),
            architecture: self.architecture.clone(),
            variant: self.variant.clone().filter(|v| !v.is_empty()),
        }
    }
}

/// A manifest list / image index.
#[derive(Debug, Clone, Deserialize)]
pub(crate) struct Index {
    pub(crate) manifests: Vec<Descriptor>,
}

/// An image manifest.
#[derive(Debug, Clone, Deserialize)]
pub(crate) struct ImageManifest {
    pub(crate) config: Descriptor,
    pub(crate) layers: Vec<Descriptor>,
}

/// What a manifest response turned out to be.
#[derive(Debug, Clone)]
pub(crate) enum Manifest {
    Index(Index),
    Image(ImageManifest),
}

#[derive(Deserialize)]
struct Probe {
    #[serde(rename = "schemaVersion", default)]
    schema_version: u32,
    #[serde(rename = "mediaType", default)]
    media_type: Option<String>,
    #[serde(default)]
    manifests: Option<serde_json::Value>,
    #[serde(default)]
    layers: Option<serde_json::Value>,
}

/// Parses a manifest body; `content_type` is the response's, if any.
pub(crate) fn parse_manifest(body: &[u8], content_type: Option<&str>) -> Result<Manifest, String> {
    let probe: Probe =
        serde_json::from_slice(body).map_err(|e| format!("manifest is not JSON: {e}"))?;
    if probe.schema_version == 1 {
        return Err("Docker schema 1 manifests are not supported (push the image again with a current tool)".to_owned());
    }
    let ctype = content_type
        .map(|c| c.split(';').next().unwrap_or("").trim().to_owned())
        .filter(|c| c != "application/json" && !c.is_empty());
    let kind = ctype.or(probe.media_type);
    let is_index = match kind.as_deref() {
        Some(OCI_INDEX | DOCKER_LIST) => true,
        Some(OCI_MANIFEST | DOCKER_MANIFEST) => false,
        Some(other) if other.contains("manifest.v1") => {
            return Err(format!("{other} (schema 1) manifests are not supported"));
        }
        // Unknown or absent: decide by shape (OCI allows omitting mediaType).
        _ => probe.manifests.is_some() && probe.layers.is_none(),
    };
    if is_index {
        serde_json::from_slice(body)
            .map(Manifest::Index)
            .map_err(|e| format!("invalid image index: {e}"))
    } else {
        serde_json::from_slice(body)
            .map(Manifest::Image)
            .map_err(|e| format!("invalid image manifest: {e}"))
    }
}

/// Checks what an image manifest points at before anything is downloaded.
pub(crate) fn check_image_manifest(m: &ImageManifest) -> Result<(), String> {
    if !m.config.media_type.is_empty() && !CONFIG_TYPES.contains(&m.config.media_type.as_str()) {
        return Err(format!(
            "its config has media type {}: not a container image",
            m.config.media_type
        ));
    }
    super::reference::check_digest(&m.config.digest).map_err(|e| format!("config digest: {e}"))?;
    for l in &m.layers {
        super::reference::check_digest(&l.digest)
            .map_err(|e| format!("layer digest {}: {e}", l.digest))?;
    }
    Ok(())
}

/// Whether a layer's media type is one we unpack.
pub(crate) fn layer_type_supported(media_type: &str) -> bool {
    media_type.is_empty() || LAYER_TYPES.contains(&media_type)
}

/// Picks the manifest for `want` from an index: same os and architecture;
/// among those an exact (normalised) variant, else one without a variant,
/// else (for arm) a lower variant. Attestation entries (`unknown/unknown`)
/// never match.
pub(crate) fn select_platform<'a>(index: &'a Index, want: &Platform) -> Option<&'a Descriptor> {
    let want_variant = want.normalized_variant();
    index
        .manifests
        .iter()
        .filter_map(|d| {
            let p = d.platform.as_ref()?.to_platform();
            if p.os != want.os || p.architecture != want.architecture {
                return None;
            }
            let have = p.normalized_variant();
            let score = if have == want_variant {
                (3, 0)
            } else if p.variant.is_none() {
                (2, 0)
            } else if want.architecture == "arm"
                && matches!((have, want_variant), (Some(h), Some(w)) if h < w)
            {
                // The highest lower variant: v7 code runs on v8, v6 on v7.
                let level = have
                    .and_then(|v| v.strip_prefix('v'))
                    .and_then(|n| n.parse::<u32>().ok())
                    .unwrap_or(0);
                (1, level)
            } else {
                return None;
            };
            Some((score, d))
        })
        // max_by_key keeps the last of equals; reverse to prefer the first.
        .rev()
        .max_by_key(|(score, _)| *score)
        .map(|(_, d)| d)
}

/// The platforms an index lists, for error messages.
pub(crate) fn platforms(index: &Index) -> String {
    let list: Vec<String> = index
        .manifests
        .iter()
        .filter_map(|d| d.platform.as_ref())
        .map(|p| p.to_platform().to_string())
        .collect();
    if list.is_empty() {
        "no platforms listed".to_owned()
    } else {
        list.join(", ")
    }
}

/// What an image says about how to run it (the `config` of its config blob).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct ImageConfig {
    /// `Env`, split at the first `=` (an entry without one has an empty value).
    pub env: Vec<(String, String)>,
    /// `Cmd`.
    pub cmd: Option<Vec<String>>,
    /// `Entrypoint`.
    pub entrypoint: Option<Vec<String>>,
    /// `WorkingDir`, if not empty.
    pub workdir: Option<String>,
    /// `User`, if not empty.
    pub user: Option<String>,
    /// `ExposedPorts` keys, e.g. `80/tcp`, sorted.
    pub exposed_ports: Vec<String>,
    /// `Labels`.
    pub labels: BTreeMap<String, String>,
    /// `os` of the image.
    pub os: String,
    /// `architecture` of the image.
    pub architecture: String,
}

#[derive(Deserialize, Default)]
#[serde(default)]
struct ConfigFile {
    architecture: String,
    os: String,
    config: Option<ContainerConfig>,
    rootfs: Option<RootFs>,
}

#[derive(Deserialize, Default)]
#[serde(default, rename_all = "PascalCase")]
struct ContainerConfig {
    env: Option<Vec<String>>,
    cmd: Option<Vec<String>>,
    entrypoint: Option<Vec<String>>,
    working_dir: Option<String>,
    user: Option<String>,
    exposed_ports: Option<BTreeMap<String, serde_json::Value>>,
    labels: Option<BTreeMap<String, Option<String>>>,
}

#[derive(Deserialize, Default)]
#[serde(default)]
struct RootFs {
    diff_ids: Vec<String>,
}

/// Parses an image config blob: the run config and the layers' diff ids.
pub(crate) fn parse_config(body: &[u8]) -> Result<(ImageConfig, Vec<String>), String> {
    let file: ConfigFile =
        serde_json::from_slice(body).map_err(|e| format!("invalid image config: {e}"))?;
    let c = file.config.unwrap_or_default();
    let config = ImageConfig {
        env: c
            .env
            .unwrap_or_default()
            .into_iter()
            .map(|e| match e.split_once('=') {
                Some((k, v)) => (k.to_owned(), v.to_owned()),
                None => (e, String::new()),
            })
            .collect(),
        cmd: c.cmd,
        entrypoint: c.entrypoint,
        workdir: c.working_dir.filter(|w| !w.is_empty()),
        user: c.user.filter(|u| !u.is_empty()),
        exposed_ports: c.exposed_ports.unwrap_or_default().into_keys().collect(),
        labels: c
            .labels
            .unwrap_or_default()
            .into_iter()
            .map(|(k, v)| (k, v.unwrap_or_default()))
            .collect(),
        os: file.os,
        architecture: file.architecture,
    };
    Ok((config, file.rootfs.unwrap_or_default().diff_ids))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn index(entries: &[(&str, &str, Option<&str>)]) -> Index {
        let manifests: Vec<serde_json::Value> = entries
            .iter()
            .enumerate()
            .map(|(i, (os, arch, variant))| {
                let mut p = serde_json::json!({"os": os, "architecture": arch});
                if let Some(v) = variant {
                    p["variant"] = serde_json::json!(v);
                }
                serde_json::json!({
                    "mediaType": OCI_MANIFEST,
                    "digest": format!("sha256:{i:064}"),
                    "size": 1,
                    "platform": p,
                })
            })
            .collect();
        let body = serde_json::to_vec(&serde_json::json!({
            "schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": manifests
        }))
        .unwrap();
        match parse_manifest(&body, None).unwrap() {
            Manifest::Index(i) => i,
            Manifest::Image(_) => panic!("parsed as an image manifest"),
        }
    }

    fn pick(ix: &Index, want: &str) -> Option<usize> {
        let want = Platform::parse(want).unwrap();
        select_platform(ix, &want).map(|d| {
            ix.manifests
                .iter()
                .position(|m| m.digest == d.digest)
                .unwrap()
        })
    }

    #[test]
    fn selects_os_arch_and_variant() {
        let ix = index(&[
            ("unknown", "unknown", None),
            ("linux", "arm", Some("v6")),
            ("linux", "arm", Some("v7")),
            ("linux", "arm64", Some("v8")),
            ("linux", "amd64", None),
            ("windows", "amd64", None),
            ("linux", "s390x", None),
        ]);
        assert_eq!(pick(&ix, "linux/amd64"), Some(4));
        assert_eq!(pick(&ix, "windows/amd64"), Some(5));
        assert_eq!(pick(&ix, "linux/arm64"), Some(3), "no variant means v8");
        assert_eq!(pick(&ix, "linux/arm64/v8"), Some(3));
        assert_eq!(pick(&ix, "linux/arm/v7"), Some(2));
        assert_eq!(pick(&ix, "linux/arm/v6"), Some(1));
        assert_eq!(
            pick(&ix, "linux/arm/v8"),
            Some(2),
            "the highest lower arm variant"
        );
        assert_eq!(pick(&ix, "linux/riscv64"), None);
        assert_eq!(pick(&ix, "linux/arm/v5"), None);

        // Without an arm64 variant in the index, a v8 request still matches.
        let ix = index(&[("linux", "arm64", None), ("linux", "amd64", Some("v2"))]);
        assert_eq!(pick(&ix, "linux/arm64/v8"), Some(0));
        assert_eq!(
            pick(&ix, "linux/amd64"),
            None,
            "a v2-only image does not run on baseline amd64"
        );
        assert_eq!(pick(&ix, "linux/amd64/v2"), Some(1));
        assert!(platforms(&ix).contains("linux/amd64/v2"));
    }

    #[test]
    fn host_platform_is_linux() {
        let p = Platform::host();
        assert_eq!(p.os, "linux");
        #[cfg(target_arch = "x86_64")]
        assert_eq!(p.to_string(), "linux/amd64");
        assert!(Platform::parse("linux").is_err());
        assert!(Platform::parse("linux/arm/v7/x").is_err());
        assert!(Platform::parse("linux//v7").is_err());
        assert_eq!(
            Platform::parse("linux/arm/v7").unwrap().variant.as_deref(),
            Some("v7")
        );
    }

    #[test]
    fn manifest_kinds_are_told_apart() {
        let image = br#"{"schemaVersion":2,"config":{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"sha256:00","size":1},"layers":[]}"#;
        assert!(matches!(
            parse_manifest(image, None),
            Ok(Manifest::Image(_))
        ));
        assert!(matches!(
            parse_manifest(
                image,
                Some("application/vnd.docker.distribution.manifest.v2+json")
            ),
            Ok(Manifest::Image(_))
        ));
        let ix = br#"{"schemaVersion":2,"manifests":[]}"#;
        assert!(matches!(
            parse_manifest(ix, Some("application/json")),
            Ok(Manifest::Index(_))
        ));
        let v1 = br#"{"schemaVersion":1,"fsLayers":[]}"#;
        assert!(parse_manifest(v1, None).unwrap_err().contains("schema 1"));
        assert!(parse_manifest(b"<html>", None).is_err());
    }

    #[test]
    fn config_is_parsed() {
        let body = br#"{"architecture":"amd64","os":"linux","config":{"Env":["PATH=/bin:/usr/bin","EMPTY=","BARE"],
            "Cmd":["sh"],"Entrypoint":null,"WorkingDir":"/app","User":"","ExposedPorts":{"80/tcp":{},"53/udp":{}},
            "Labels":{"a":"b","n":null}},"rootfs":{"type":"layers","diff_ids":["sha256:aa"]}}"#;
        let (c, diff_ids) = parse_config(body).unwrap();
        assert_eq!(
            c.env,
            vec![
                ("PATH".to_owned(), "/bin:/usr/bin".to_owned()),
                ("EMPTY".to_owned(), String::new()),
                ("BARE".to_owned(), String::new())
            ]
        );
        assert_eq!(c.cmd, Some(vec!["sh".to_owned()]));
        assert_eq!(c.entrypoint, None);
        assert_eq!(c.workdir.as_deref(), Some("/app"));
        assert_eq!(c.user, None);
        assert_eq!(
            c.exposed_ports,
            vec!["53/udp".to_owned(), "80/tcp".to_owned()]
        );
        assert_eq!(c.labels.get("n").map(String::as_str), Some(""));
        assert_eq!(diff_ids, vec!["sha256:aa".to_owned()]);
        assert_eq!((c.os.as_str(), c.architecture.as_str()), ("linux", "amd64"));
        // A config without `config` is an image with nothing set.
        assert!(parse_config(br#"{"os":"linux"}"#).is_ok());
    }
}

//! `google.protobuf.Timestamp` with the canonical proto3 JSON form.
//!
//! The generic well-known type from `pbjson-types` prints `+00:00` after
//! fractional seconds, which protobuf-es (the JS SDK) refuses; the canonical
//! form is UTC with a `Z` and 0, 3, 6 or 9 fractional digits.

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// A point in time: seconds and nanoseconds since the Unix epoch (UTC).
#[derive(Clone, Copy, PartialEq, Eq, Hash, prost::Message)]
pub struct Timestamp {
    /// Seconds since 1970-01-01T00:00:00Z.
    #[prost(int64, tag = "1")]
    pub seconds: i64,
    /// Nanoseconds within the second, 0 to 999,999,999.
    #[prost(int32, tag = "2")]
    pub nanos: i32,
}

impl Timestamp {
    /// The canonical JSON text, such as `2026-01-01T00:00:00.123Z`.
    pub fn to_rfc3339(&self) -> String {
        let nanos = u32::try_from(self.nanos).unwrap_or(0).min(999_999_999);
        let Some(dt) = chrono::DateTime::from_timestamp(self.seconds, nanos) else {
            return "1970-01-01T00:00:00Z".to_string();
        };
        let base = dt.format("%Y-%m-%dT%H:%M:%S").to_string();
        let frac = if nanos == 0 {
            String::new()
        } else if nanos % 1_000_000 == 0 {
            format!(".{:03}", nanos / 1_000_000)
        } else if nanos % 1_000 == 0 {
            format!(".{:06}", nanos / 1_000)
        } else {
            format!(".{nanos:09}")
        };
        format!("{base}{frac}Z")
    }
}

impl Serialize for Timestamp {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.to_rfc3339())
    }
}

impl<'de> Deserialize<'de> for Timestamp {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        let dt = chrono::DateTime::parse_from_rfc3339(&text).map_err(serde::de::Error::custom)?;
        Ok(Timestamp {
            seconds: dt.timestamp(),
            nanos: i32::try_from(dt.timestamp_subsec_nanos()).unwrap_or(0),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_is_utc_with_z_and_trimmed_fractions() {
        let t = |s, n| {
            Timestamp {
                seconds: s,
                nanos: n,
            }
            .to_rfc3339()
        };
        assert_eq!(t(0, 0), "1970-01-01T00:00:00Z");
        assert_eq!(t(1_767_225_600, 123_000_000), "2026-01-01T00:00:00.123Z");
        assert_eq!(t(1_767_225_600, 123_456_000), "2026-01-01T00:00:00.123456Z");
        assert_eq!(
            t(1_767_225_600, 981_374_381),
            "2026-01-01T00:00:00.981374381Z"
        );
    }

    #[test]
    fn any_offset_parses() {
        let a: Timestamp = serde_json::from_str(r#""2026-01-01T01:00:00.5+01:00""#).unwrap();
        assert_eq!(
            a,
            Timestamp {
                seconds: 1_767_225_600,
                nanos: 500_000_000
            }
        );
    }
}

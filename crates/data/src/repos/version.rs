//! PEP 440 versions, parsed far enough to order the releases of the SWE-bench projects:
//! `[N!]N(.N)*[{a|b|rc}N][.postN][.devN][+local]`, with the spellings PEP 440 normalises
//! (`alpha`, `beta`, `c`, `pre`, `preview`, `-1` for a post release, `r`/`rev`, a
//! leading `v`, `-` and `_` as separators). Ordering follows PEP 440:
//! `1.0.dev1 < 1.0a1.dev1 < 1.0a1 < 1.0a1.post1 < 1.0b1 < 1.0rc1 < 1.0 < 1.0.post1.dev1
//! < 1.0.post1`, and `1.0 == 1.0.0`. The local part is parsed and ignored for ordering
//! (PyPI does not host local versions).

use std::cmp::Ordering;

/// A parsed version.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Version {
    pub epoch: u64,
    /// Release numbers with trailing zeros trimmed (so `1.0 == 1.0.0`).
    pub release: Vec<u64>,
    /// `(phase, n)`: phase 0 = a, 1 = b, 2 = rc.
    pub pre: Option<(u8, u64)>,
    pub post: Option<u64>,
    pub dev: Option<u64>,
}

impl Version {
    /// Parse a version string; `None` when it is not PEP 440 (legacy versions).
    pub fn parse(s: &str) -> Option<Version> {
        let s = s.trim().to_ascii_lowercase();
        let s = s.strip_prefix('v').unwrap_or(&s);
        let s = s.split('+').next().unwrap_or(s); // drop the local part
        let b = s.as_bytes();
        let mut i = 0;
        let num = |i: &mut usize| -> Option<u64> {
            let st = *i;
            while *i < b.len() && b[*i].is_ascii_digit() {
                *i += 1;
            }
            if st == *i {
                return None;
            }
            s[st..*i].parse().ok()
        };
        let mut epoch = 0;
        let first = num(&mut i)?;
        let mut release = vec![first];
        if i < b.len() && b[i] == b'!' {
            i += 1;
            epoch = first;
            release = vec![num(&mut i)?];
        }
        while i + 1 < b.len() && b[i] == b'.' && b[i + 1].is_ascii_digit() {
            i += 1;
            release.push(num(&mut i)?);
        }
        let sep = |i: &mut usize| {
            if *i < b.len() && matches!(b[*i], b'.' | b'-' | b'_') {
                *i += 1;
            }
        };
        let word = |i: &mut usize, words: &[&str]| -> bool {
            for w in words {
                if s[*i..].starts_with(w) {
                    *i += w.len();
                    return true;
                }
            }
            false
        };
        // Optional number after a tag, with an optional separator; 0 when absent.
        let tag_num = |i: &mut usize| -> u64 {
            let save = *i;
            sep(i);
            match num(i) {
                Some(n) => n,
                None => {
                    *i = save;
                    0
                }
            }
        };
        let mut pre = None;
        let save = i;
        sep(&mut i);
        // Longest spellings first.
        let phases: [(&[&str], u8); 3] = [
            (&["alpha", "a"], 0),
            (&["beta", "b"], 1),
            (&["preview", "pre", "rc", "c"], 2),
        ];
        let mut got = false;
        for (words, phase) in phases {
            if word(&mut i, words) {
                pre = Some((phase, tag_num(&mut i)));
                got = true;
                break;
            }
        }
        if !got {
            i = save;
        }
        let mut post = None;
        let save = i;
        if i < b.len() && b[i] == b'-' && i + 1 < b.len() && b[i + 1].is_ascii_digit() {
            i += 1;
            post = Some(num(&mut i)?);
        } else {
            sep(&mut i);
            if word(&mut i, &["post", "rev", "r"]) {
                post = Some(tag_num(&mut i));
            } else {
                i = save;
            }
        }
        let mut dev = None;
        let save = i;
        sep(&mut i);
        if word(&mut i, &["dev"]) {
            dev = Some(tag_num(&mut i));
        } else {
            i = save;
        }
        if i != b.len() {
            return None;
        }
        while release.len() > 1 && release.last() == Some(&0) {
            release.pop();
        }
        Some(Version {
            epoch,
            release,
            pre,
            post,
            dev,
        })
    }

    /// A pre-release or a development release.
    pub fn is_prerelease(&self) -> bool {
        self.pre.is_some() || self.dev.is_some()
    }

    fn key(&self) -> (u64, &[u64], (i64, i64), i64, i64) {
        let pre = match (self.pre, self.post, self.dev) {
            (Some((p, n)), _, _) => (i64::from(p), n as i64),
            // `1.0.dev1` sorts before `1.0a1`.
            (None, None, Some(_)) => (-1, 0),
            _ => (3, 0),
        };
        let post = self.post.map_or(-1, |n| n as i64);
        let dev = self.dev.map_or(i64::MAX, |n| n as i64);
        (self.epoch, &self.release, pre, post, dev)
    }
}

impl Ord for Version {
    fn cmp(&self, other: &Self) -> Ordering {
        self.key().cmp(&other.key())
    }
}

impl PartialOrd for Version {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v(s: &str) -> Version {
        Version::parse(s).unwrap_or_else(|| panic!("{s} does not parse"))
    }

    #[test]
    fn orders_like_pep440() {
        let order = [
            "0.9",
            "1.0.dev0",
            "1.0.dev1",
            "1.0a1.dev1",
            "1.0a1",
            "1.0a1.post1",
            "1.0alpha2",
            "1.0b1",
            "1.0rc1",
            "1.0c2",
            "1.0",
            "1.0.post1.dev1",
            "1.0.post1",
            "1.0-2",
            "1.0.1",
            "1.2",
            "1.10",
            "2.0.0",
            "1!0.1",
        ];
        for w in order.windows(2) {
            assert!(v(w[0]) < v(w[1]), "{} < {}", w[0], w[1]);
        }
        assert_eq!(v("1.0"), v("1.0.0"));
        assert_eq!(v("v2.3.0"), v("2.3"));
        assert_eq!(v("1.0RC1"), v("1.0rc1"));
        assert_eq!(v("2.0+local.1"), v("2.0"));
        assert!(v("1.0rc1").is_prerelease() && v("1.0.dev0").is_prerelease());
        assert!(!v("1.0.post1").is_prerelease());
        assert!(Version::parse("1.0-foo").is_none());
        assert!(Version::parse("latest").is_none());
        assert!(Version::parse("").is_none());
    }

    #[test]
    fn sorts_real_release_lists() {
        let mut vs = [
            "2.10.0", "2.9.2", "2.0.1", "2.3.0", "0.14.2", "3.0.0b1", "2.31.0",
        ]
        .map(v)
        .to_vec();
        vs.sort();
        let back: Vec<String> = vs
            .iter()
            .map(|x| {
                x.release
                    .iter()
                    .map(u64::to_string)
                    .collect::<Vec<_>>()
                    .join(".")
            })
            .collect();
        assert_eq!(
            back,
            ["0.14.2", "2.0.1", "2.3", "2.9.2", "2.10", "2.31", "3"]
        );
    }
}

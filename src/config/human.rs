//! Flag values written the way people write them: durations ("15m", "500ms"), distances
//! ("5km", "800m") and shares ("10%"). Each prints the way it parses, so a default taken
//! from a domain config shows in `--help` as an operator would type it.

use std::{fmt, str::FromStr, time::Duration};

/// A duration flag: parses humantime ("15m", "90s", "500ms", "72h") and prints the largest
/// whole unit, keeping a minute or less in seconds ("60s", not "1m").
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Human(pub Duration);

impl Human {
    /// The duration.
    pub fn get(self) -> Duration {
        self.0
    }
}

impl fmt::Display for Human {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let d = self.0;
        if !d.subsec_nanos().is_multiple_of(1_000_000) {
            // Finer than a millisecond: humantime spells it out.
            return write!(f, "{}", humantime::format_duration(d));
        }
        if d.subsec_millis() != 0 {
            return write!(f, "{}ms", d.as_millis());
        }
        let s = d.as_secs();
        if s > 60 && s.is_multiple_of(3_600) {
            write!(f, "{}h", s / 3_600)
        } else if s > 60 && s.is_multiple_of(60) {
            write!(f, "{}m", s / 60)
        } else {
            write!(f, "{s}s")
        }
    }
}

impl FromStr for Human {
    type Err = humantime::DurationError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        humantime::parse_duration(s).map(Self)
    }
}

/// A distance flag, metres: parses "5km", "800m" or plain metres, and prints whole
/// kilometres as "5km", anything else in metres.
#[derive(Debug, Clone, Copy, PartialEq, PartialOrd)]
pub struct Distance(pub f64);

impl Distance {
    /// The distance in metres.
    pub fn m(self) -> f64 {
        self.0
    }
}

impl fmt::Display for Distance {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let m = self.0;
        if m >= 1_000.0 && m % 1_000.0 == 0.0 {
            write!(f, "{}km", m / 1_000.0)
        } else {
            write!(f, "{m}m")
        }
    }
}

impl FromStr for Distance {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let t = s.trim();
        let (number, scale) = if let Some(k) = t.strip_suffix("km") {
            (k, 1_000.0)
        } else if let Some(m) = t.strip_suffix('m') {
            (m, 1.0)
        } else {
            (t, 1.0)
        };
        let v: f64 = number
            .trim()
            .parse()
            .map_err(|_| format!("{s:?}: expected a distance such as 5km or 800m"))?;
        if !v.is_finite() || v < 0.0 {
            return Err(format!("{s:?}: must be a distance >= 0"));
        }
        Ok(Self(v * scale))
    }
}

/// A share flag: parses "10%" or "0.1" (0% to 1000%) and prints a percentage.
#[derive(Debug, Clone, Copy, PartialEq, PartialOrd)]
pub struct Share(pub f64);

impl Share {
    /// The share as a fraction (10% is 0.1).
    pub fn fraction(self) -> f64 {
        self.0
    }
}

impl fmt::Display for Share {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}%", self.0 * 100.0)
    }
}

impl FromStr for Share {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (number, scale) = match s.strip_suffix('%') {
            Some(p) => (p, 100.0),
            None => (s, 1.0),
        };
        let v: f64 = number
            .trim()
            .parse()
            .map_err(|_| format!("{s:?}: expected a share such as 10% or 0.1"))?;
        let v = v / scale;
        if !(0.0..=10.0).contains(&v) {
            return Err(format!("{s:?}: must be between 0% and 1000%"));
        }
        Ok(Self(v))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_print_as_operators_write_them_and_parse_back() {
        for (d, shown) in [
            (Duration::from_secs(15 * 60), "15m"),
            (Duration::from_secs(72 * 3_600), "72h"),
            (Duration::from_secs(2), "2s"),
            (Duration::from_secs(60), "60s"),
            (Duration::from_secs(90), "90s"),
            (Duration::from_millis(500), "500ms"),
            (Duration::from_millis(1_500), "1500ms"),
            (Duration::from_millis(20), "20ms"),
            (Duration::ZERO, "0s"),
        ] {
            assert_eq!(Human(d).to_string(), shown);
            assert_eq!(shown.parse::<Human>().unwrap(), Human(d), "{shown}");
        }
        let fine = Human(Duration::from_micros(1_500));
        assert_eq!(fine.to_string().parse::<Human>().unwrap(), fine);
        assert!("soon".parse::<Human>().is_err());
    }

    #[test]
    fn distances_and_shares_print_as_they_parse() {
        for (m, shown) in [(5_000.0, "5km"), (800.0, "800m"), (1_500.0, "1500m")] {
            assert_eq!(Distance(m).to_string(), shown);
            assert_eq!(shown.parse::<Distance>().unwrap(), Distance(m));
        }
        assert_eq!("250".parse::<Distance>().unwrap(), Distance(250.0));
        assert!("-1km".parse::<Distance>().is_err());
        assert!("far".parse::<Distance>().is_err());
        assert_eq!(Share(0.1).to_string(), "10%");
        assert_eq!("10%".parse::<Share>().unwrap(), Share(0.1));
        assert_eq!("0.25".parse::<Share>().unwrap(), Share(0.25));
        assert!("2000%".parse::<Share>().is_err());
    }
}

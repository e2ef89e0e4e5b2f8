//! QaTa-style notes from the published grammar (../shared/DATASETS.md):
//! "Bilateral pulmonary infection, two infected areas, all left lung and lower right lung."
//! Zones are vertical thirds of each lung field; "left" is the image's left half, as in LViT's
//! figures. A small rate of the real notes' noise (typos, missing or doubled spaces) is added.

use crate::rng::Rng;

pub const ZONES: [&str; 3] = ["upper", "middle", "lower"];

/// Infected zones per side: `[left, right]`, each three booleans (upper, middle, lower).
pub type Zones = [[bool; 3]; 2];

fn zones_text(z: &[bool; 3]) -> String {
    if z.iter().all(|&x| x) {
        return "all".into();
    }
    ZONES.iter().zip(z).filter(|(_, &on)| on).map(|(n, _)| *n).collect::<Vec<_>>().join(" ")
}

/// Areas are runs of adjacent infected zones ("upper lower" = two areas, "all" = one).
fn areas(z: &[bool; 3]) -> usize {
    (0..3).filter(|&i| z[i] && (i == 0 || !z[i - 1])).count()
}

const COUNTS: [&str; 5] = ["zero", "one", "two", "three", "four"];

/// The canonical note for some infected zones (at least one zone infected).
pub fn note(z: &Zones) -> String {
    let sides: Vec<usize> = (0..2).filter(|&s| z[s].iter().any(|&x| x)).collect();
    let n = sides.iter().map(|&s| areas(&z[s])).sum::<usize>().clamp(1, 4);
    let count = format!("{} infected {}", COUNTS[n], if n == 1 { "area" } else { "areas" });
    if sides.len() == 2 {
        format!(
            "Bilateral pulmonary infection, {count}, {} left lung and {} right lung.",
            zones_text(&z[0]),
            zones_text(&z[1])
        )
    } else {
        let s = sides.first().copied().unwrap_or(0);
        let side = if s == 0 { "left" } else { "right" };
        format!("Unilateral pulmonary infection, {count}, {} {side} lung.", zones_text(&z[s]))
    }
}

/// The real notes' noise, applied with probability `rate`: a missing space after a comma, a
/// doubled space, or a letter doubled or dropped in a zone word ("uppper", "midle").
pub fn add_noise(note: &str, rate: f64, rng: &mut Rng) -> String {
    if (rng.uniform(0.0, 1.0) as f64) >= rate {
        return note.to_string();
    }
    match rng.next_u64() % 3 {
        0 => note.replacen(", ", ",", 1),
        1 => note.replacen(' ', "  ", 1),
        _ => {
            let words: Vec<&str> = note.split(' ').collect();
            let cand: Vec<usize> = (0..words.len()).filter(|&i| ZONES.contains(&words[i])).collect();
            if cand.is_empty() {
                return note.to_string();
            }
            let i = cand[(rng.next_u64() % cand.len() as u64) as usize];
            let w = words[i];
            let k = 1 + (rng.next_u64() % (w.len() as u64 - 1)) as usize;
            let typo = if rng.next_u64().is_multiple_of(2) {
                format!("{}{}", &w[..k], &w[k - 1..])
            } else {
                format!("{}{}", &w[..k - 1], &w[k..])
            };
            let mut out: Vec<String> = words.iter().map(|s| s.to_string()).collect();
            out[i] = typo;
            out.join(" ")
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn notes_follow_the_grammar() {
        let all = [true; 3];
        let none = [false; 3];
        assert_eq!(
            note(&[all, all]),
            "Bilateral pulmonary infection, two infected areas, all left lung and all right lung."
        );
        assert_eq!(
            note(&[[true, true, false], none]),
            "Unilateral pulmonary infection, one infected area, upper middle left lung."
        );
        assert_eq!(
            note(&[none, [false, false, true]]),
            "Unilateral pulmonary infection, one infected area, lower right lung."
        );
        assert_eq!(
            note(&[[false, true, false], [true, false, true]]),
            "Bilateral pulmonary infection, three infected areas, middle left lung and upper lower right lung."
        );
    }
}

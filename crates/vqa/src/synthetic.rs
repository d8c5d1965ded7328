//! The synthetic VQA task of the CPU default run: small seeded pictures of coloured shapes on a
//! black canvas, with four-option questions in task families of different difficulty, so that
//! per-family Acc@1 and Pass@K differ visibly even for a tiny model.
//!
//! | family | picture | question | difficulty |
//! |---|---|---|---|
//! | `shape` | one large shape | which shape | easy |
//! | `colour` | one large shape | which colour | easy |
//! | `position` | one small shape inside one quadrant | which quadrant | medium |
//! | `count` | 1-6 small shapes | how many shapes | hard |
//! | `colour_count` | 1-6 small shapes, 0-3 of one colour | how many of that colour | hardest |
//!
//! Item `i` uses family `families[i % len]` and its own ChaCha8 stream of the seed, so it is the
//! same picture and question whatever the number of items. Canvas sides are multiples of 28 (the
//! vision tower's merged patch), so the image processor never resizes them. Records have
//! `dataset: "synthetic"` and `modality: <family>`, like any real dataset's.

use std::fmt;
use std::path::Path;
use std::str::FromStr;

use image::{Rgb, RgbImage};
use rand::seq::{IndexedRandom, SliceRandom};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use crate::datasets::DataError;
use crate::record::VqaRecord;
use crate::template::option_letter;

/// The `dataset` value of synthetic records.
pub const DATASET: &str = "synthetic";

/// The canvas background.
pub const BACKGROUND: [u8; 3] = [0, 0, 0];

/// Colour names and their RGB values, far apart so that no two read alike.
pub const COLOURS: [(&str, [u8; 3]); 6] = [
    ("red", [220, 40, 40]),
    ("green", [40, 190, 60]),
    ("blue", [50, 90, 235]),
    ("yellow", [235, 215, 40]),
    ("purple", [150, 60, 210]),
    ("orange", [245, 140, 30]),
];

/// Quadrant names of the `position` family, in index order (row-major).
pub const QUADRANTS: [&str; 4] = ["top left", "top right", "bottom left", "bottom right"];

/// A shape the rasteriser draws.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ShapeKind {
    /// Filled disc.
    Circle,
    /// Filled axis-aligned square.
    Square,
    /// Filled triangle, apex up.
    Triangle,
    /// Filled square rotated by 45 degrees.
    Diamond,
}

impl ShapeKind {
    /// Every kind, in option order.
    pub const ALL: [ShapeKind; 4] = [ShapeKind::Circle, ShapeKind::Square, ShapeKind::Triangle, ShapeKind::Diamond];

    /// The kind's name as an answer option.
    pub fn name(self) -> &'static str {
        match self {
            Self::Circle => "circle",
            Self::Square => "square",
            Self::Triangle => "triangle",
            Self::Diamond => "diamond",
        }
    }

    /// Whether the point `(dx, dy)` from the centre lies inside a shape of half-size `r`.
    fn contains(self, dx: f32, dy: f32, r: f32) -> bool {
        match self {
            Self::Circle => dx * dx + dy * dy <= r * r,
            Self::Square => dx.abs() <= r && dy.abs() <= r,
            Self::Diamond => dx.abs() + dy.abs() <= r,
            // Apex (0, -r), base corners (+-r, r): inside when below the apex and within the two
            // slanted sides, whose half-width grows from 0 at the apex to r at the base.
            Self::Triangle => dy <= r && dx.abs() <= (dy + r) / 2.0,
        }
    }
}

/// One drawn shape: kind, index into [`COLOURS`], integer centre and half-size in pixels.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Shape {
    /// What is drawn.
    pub kind: ShapeKind,
    /// Index into [`COLOURS`].
    pub colour: usize,
    /// Centre column.
    pub cx: i32,
    /// Centre row.
    pub cy: i32,
    /// Half-size: the shape covers columns `cx - r .. cx + r` and rows `cy - r .. cy + r`.
    pub r: i32,
}

/// A task family: what is asked about the picture.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Family {
    /// Which shape (easy).
    Shape,
    /// Which colour (easy).
    Colour,
    /// Which quadrant (medium).
    Position,
    /// How many shapes (hard).
    Count,
    /// How many shapes of one colour among others (hardest).
    ColourCount,
}

impl Family {
    /// Every family, easiest first.
    pub const ALL: [Family; 5] = [Family::Shape, Family::Colour, Family::Position, Family::Count, Family::ColourCount];

    /// The family's name, also the records' `modality`.
    pub fn name(self) -> &'static str {
        match self {
            Self::Shape => "shape",
            Self::Colour => "colour",
            Self::Position => "position",
            Self::Count => "count",
            Self::ColourCount => "colour_count",
        }
    }
}

impl FromStr for Family {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let s = if s == "color" { "colour" } else if s == "color_count" { "colour_count" } else { s };
        Family::ALL.into_iter().find(|f| f.name() == s).ok_or_else(|| {
            let names: Vec<&str> = Family::ALL.iter().map(|f| f.name()).collect();
            format!("unknown synthetic family {s:?}; expected one of {}", names.join(", "))
        })
    }
}

impl fmt::Display for Family {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// What to generate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SyntheticSpec {
    /// Number of items.
    pub count: usize,
    /// Seed; item `i` uses stream `i` of it.
    pub seed: u64,
    /// Canvas side in pixels: a multiple of 28, at least 56.
    pub canvas: u32,
    /// Families, used round-robin.
    pub families: Vec<Family>,
    /// How records refer to the image folder (relative to the JSONL's folder).
    pub image_prefix: String,
}

impl Default for SyntheticSpec {
    fn default() -> Self {
        Self { count: 200, seed: 0, canvas: 56, families: Family::ALL.to_vec(), image_prefix: "images".into() }
    }
}

impl SyntheticSpec {
    /// Checks the canvas size and the family list.
    pub fn validate(&self) -> Result<(), DataError> {
        if self.canvas < 56 || !self.canvas.is_multiple_of(28) {
            return Err(DataError::Invalid(format!("canvas {} px: must be a multiple of 28 and at least 56", self.canvas)));
        }
        if self.families.is_empty() {
            return Err(DataError::Invalid("no synthetic family chosen".into()));
        }
        Ok(())
    }
}

/// One generated item: its record, the shapes behind it and the picture.
#[derive(Debug, Clone)]
pub struct SyntheticItem {
    /// The VQA record (image path under the spec's prefix).
    pub record: VqaRecord,
    /// What was drawn, for checks.
    pub shapes: Vec<Shape>,
    /// The picture.
    pub image: RgbImage,
}

/// Draws shapes on a black square canvas, sampling each pixel at its centre.
pub fn render(shapes: &[Shape], canvas: u32) -> RgbImage {
    let mut img = RgbImage::from_pixel(canvas, canvas, Rgb(BACKGROUND));
    let side = canvas as i32;
    for s in shapes {
        let colour = Rgb(COLOURS[s.colour % COLOURS.len()].1);
        for y in (s.cy - s.r).max(0)..(s.cy + s.r).min(side) {
            for x in (s.cx - s.r).max(0)..(s.cx + s.r).min(side) {
                let (dx, dy) = (x as f32 + 0.5 - s.cx as f32, y as f32 + 0.5 - s.cy as f32);
                if s.kind.contains(dx, dy, s.r as f32) {
                    img.put_pixel(x as u32, y as u32, colour);
                }
            }
        }
    }
    img
}

/// `n` small shapes in distinct cells of a 3 x 3 grid, each inside its cell with at least a
/// one-pixel margin, so shapes never touch and can be counted.
fn scattered(rng: &mut ChaCha8Rng, canvas: i32, colours: &[usize]) -> Vec<Shape> {
    let cell = canvas / 3;
    let mut cells: Vec<i32> = (0..9).collect();
    cells.shuffle(rng);
    colours
        .iter()
        .zip(cells)
        .map(|(&colour, c)| {
            let (x0, y0) = ((c % 3) * cell, (c / 3) * cell);
            let r = rng.random_range(3..=cell / 2 - 2);
            Shape {
                kind: ShapeKind::ALL[rng.random_range(0..4)],
                colour,
                cx: rng.random_range(x0 + r + 1..=x0 + cell - r - 1),
                cy: rng.random_range(y0 + r + 1..=y0 + cell - r - 1),
                r,
            }
        })
        .collect()
}

/// One large shape anywhere on the canvas.
fn single_large(rng: &mut ChaCha8Rng, canvas: i32) -> Shape {
    let r = rng.random_range(canvas / 7..=canvas / 4);
    Shape {
        kind: ShapeKind::ALL[rng.random_range(0..4)],
        colour: rng.random_range(0..COLOURS.len()),
        cx: rng.random_range(r + 1..=canvas - r - 1),
        cy: rng.random_range(r + 1..=canvas - r - 1),
        r,
    }
}

/// The answer plus three distractors from `pool`, shuffled; returns them and the answer's index.
fn four_options(rng: &mut ChaCha8Rng, answer: &str, pool: &[String]) -> (Vec<String>, usize) {
    let others: Vec<&String> = pool.iter().filter(|p| p.as_str() != answer).collect();
    let mut options: Vec<String> = others.choose_multiple(rng, 3).map(|s| (*s).clone()).collect();
    options.push(answer.to_owned());
    options.shuffle(rng);
    let index = options.iter().position(|o| o == answer).unwrap_or(0);
    (options, index)
}

/// Item `index` of `spec` (the spec is assumed valid; see [`SyntheticSpec::validate`]).
pub fn generate_item(spec: &SyntheticSpec, index: usize) -> SyntheticItem {
    let mut rng = ChaCha8Rng::seed_from_u64(spec.seed);
    rng.set_stream(index as u64);
    let family = spec.families[index % spec.families.len().max(1)];
    let canvas = spec.canvas as i32;
    let (shapes, question, answer, pool): (Vec<Shape>, String, String, Vec<String>) = match family {
        Family::Shape => {
            let s = single_large(&mut rng, canvas);
            let pool = ShapeKind::ALL.iter().map(|k| k.name().to_owned()).collect();
            (vec![s], "Which shape is shown in the image?".into(), s.kind.name().into(), pool)
        }
        Family::Colour => {
            let s = single_large(&mut rng, canvas);
            let pool = COLOURS.iter().map(|c| c.0.to_owned()).collect();
            (vec![s], "What colour is the shape in the image?".into(), COLOURS[s.colour].0.into(), pool)
        }
        Family::Position => {
            let half = canvas / 2;
            let quadrant = rng.random_range(0..4);
            let (x0, y0) = ((quadrant % 2) * half, (quadrant / 2) * half);
            let r = rng.random_range(3..=half / 4);
            let s = Shape {
                kind: ShapeKind::ALL[rng.random_range(0..4)],
                colour: rng.random_range(0..COLOURS.len()),
                cx: rng.random_range(x0 + r + 1..=x0 + half - r - 1),
                cy: rng.random_range(y0 + r + 1..=y0 + half - r - 1),
                r,
            };
            let pool = QUADRANTS.iter().map(|q| (*q).to_owned()).collect();
            (vec![s], "In which part of the image is the shape?".into(), QUADRANTS[quadrant as usize].into(), pool)
        }
        Family::Count => {
            let n = rng.random_range(1..=6usize);
            let colours: Vec<usize> = (0..n).map(|_| rng.random_range(0..COLOURS.len())).collect();
            let shapes = scattered(&mut rng, canvas, &colours);
            let pool = (1..=6).map(|k: usize| k.to_string()).collect();
            (shapes, "How many shapes are in the image?".into(), n.to_string(), pool)
        }
        Family::ColourCount => {
            let target = rng.random_range(0..COLOURS.len());
            let k = rng.random_range(0..=3usize);
            let others = rng.random_range(if k == 0 { 1 } else { 0 }..=3usize);
            let mut colours = vec![target; k];
            colours.extend((0..others).map(|_| (target + rng.random_range(1..COLOURS.len())) % COLOURS.len()));
            let shapes = scattered(&mut rng, canvas, &colours);
            let pool = (0..=3).map(|k: usize| k.to_string()).collect();
            (shapes, format!("How many {} shapes are in the image?", COLOURS[target].0), k.to_string(), pool)
        }
    };
    let (options, answer_index) = four_options(&mut rng, &answer, &pool);
    let prefix = spec.image_prefix.trim_end_matches('/');
    let file = format!("{index:05}.png");
    let record = VqaRecord {
        id: format!("{DATASET}/{}/{index}", family.name()),
        dataset: DATASET.into(),
        modality: family.name().into(),
        images: vec![if prefix.is_empty() { file } else { format!("{prefix}/{file}") }],
        question,
        answer_label: option_letter(answer_index).map(String::from),
        answer,
        options,
    };
    let image = render(&shapes, spec.canvas);
    SyntheticItem { record, shapes, image }
}

/// Every item of `spec`.
pub fn generate(spec: &SyntheticSpec) -> Result<Vec<SyntheticItem>, DataError> {
    spec.validate()?;
    Ok((0..spec.count).map(|i| generate_item(spec, i)).collect())
}

/// Generates the items, writes their PNGs under `base` (the folder the JSONL will live in) and
/// returns the records.
pub fn write_synthetic(spec: &SyntheticSpec, base: &Path) -> Result<Vec<VqaRecord>, DataError> {
    let items = generate(spec)?;
    let dir = base.join(spec.image_prefix.trim_end_matches('/'));
    std::fs::create_dir_all(&dir).map_err(|e| DataError::io(&dir, e))?;
    let mut records = Vec::with_capacity(items.len());
    for item in items {
        let png = base.join(&item.record.images[0]);
        item.image.save(&png).map_err(|e| DataError::io(&png, std::io::Error::other(e)))?;
        records.push(item.record);
    }
    Ok(records)
}

#[cfg(test)]
mod tests {
    use std::collections::{BTreeMap, BTreeSet};

    use super::*;

    fn spec(count: usize) -> SyntheticSpec {
        SyntheticSpec { count, seed: 11, ..SyntheticSpec::default() }
    }

    /// One 8-connected blob of non-background pixels: its colour and its pixels.
    type Blob = ([u8; 3], Vec<(u32, u32)>);

    /// The blobs of a picture.
    fn blobs(img: &RgbImage) -> Vec<Blob> {
        let (w, h) = img.dimensions();
        let mut seen = vec![false; (w * h) as usize];
        let mut out = Vec::new();
        for y in 0..h {
            for x in 0..w {
                if seen[(y * w + x) as usize] || img.get_pixel(x, y).0 == BACKGROUND {
                    continue;
                }
                let colour = img.get_pixel(x, y).0;
                let mut stack = vec![(x, y)];
                let mut pixels = Vec::new();
                seen[(y * w + x) as usize] = true;
                while let Some((px, py)) = stack.pop() {
                    pixels.push((px, py));
                    for (dx, dy) in [(-1i32, -1i32), (0, -1), (1, -1), (-1, 0), (1, 0), (-1, 1), (0, 1), (1, 1)] {
                        let (nx, ny) = (px as i32 + dx, py as i32 + dy);
                        if nx < 0 || ny < 0 || nx >= w as i32 || ny >= h as i32 {
                            continue;
                        }
                        let i = (ny as u32 * w + nx as u32) as usize;
                        if !seen[i] && img.get_pixel(nx as u32, ny as u32).0 != BACKGROUND {
                            seen[i] = true;
                            stack.push((nx as u32, ny as u32));
                        }
                    }
                }
                out.push((colour, pixels));
            }
        }
        out
    }

    /// Tells the shape of a single blob from the picture alone.
    fn classify(pixels: &[(u32, u32)]) -> &'static str {
        let (x0, x1) = (pixels.iter().map(|p| p.0).min().unwrap_or(0), pixels.iter().map(|p| p.0).max().unwrap_or(0));
        let (y0, y1) = (pixels.iter().map(|p| p.1).min().unwrap_or(0), pixels.iter().map(|p| p.1).max().unwrap_or(0));
        let fill = pixels.len() as f64 / f64::from((x1 - x0 + 1) * (y1 - y0 + 1));
        let width = |y: u32| pixels.iter().filter(|p| p.1 == y).count();
        if fill > 0.95 {
            "square"
        } else if fill > 0.7 {
            "circle"
        } else if width(y1) > width((y0 + y1) / 2) {
            "triangle"
        } else {
            "diamond"
        }
    }

    #[test]
    fn deterministic_and_independent_of_count() {
        let a = generate(&spec(40)).expect("valid");
        let b = generate(&spec(60)).expect("valid");
        for (x, y) in a.iter().zip(&b) {
            assert_eq!(x.record, y.record);
            assert_eq!(x.image, y.image);
        }
        let c = generate(&SyntheticSpec { seed: 12, ..spec(40) }).expect("valid");
        assert_ne!(a.iter().map(|i| &i.image).collect::<Vec<_>>(), c.iter().map(|i| &i.image).collect::<Vec<_>>());
    }

    #[test]
    fn answers_match_the_pictures() {
        let items = generate(&spec(500)).expect("valid");
        let mut per_family: BTreeMap<&str, usize> = BTreeMap::new();
        let mut letters: BTreeSet<String> = BTreeSet::new();
        for item in &items {
            let r = &item.record;
            assert!(r.validate().is_ok(), "{r:?}");
            assert_eq!(r.options.len(), 4);
            assert_eq!(r.options.iter().collect::<BTreeSet<_>>().len(), 4, "distinct options");
            assert_eq!(item.image.dimensions(), (56, 56));
            letters.insert(r.answer_label.clone().unwrap_or_default());
            *per_family.entry(r.modality.as_str()).or_default() += 1;
            let found = blobs(&item.image);
            match r.modality.as_str() {
                "shape" => {
                    assert_eq!(found.len(), 1);
                    assert_eq!(classify(&found[0].1), r.answer, "{r:?} {:?}", item.shapes);
                }
                "colour" => {
                    let rgb = COLOURS.iter().find(|c| c.0 == r.answer).map(|c| c.1);
                    assert!(found.len() == 1 && Some(found[0].0) == rgb);
                }
                "position" => {
                    let (sx, sy) = found[0].1.iter().fold((0u32, 0u32), |(a, b), p| (a + p.0, b + p.1));
                    let n = found[0].1.len() as u32;
                    let q = usize::from(sx / n >= 28) + 2 * usize::from(sy / n >= 28);
                    assert_eq!(QUADRANTS[q], r.answer);
                }
                "count" => assert_eq!(found.len().to_string(), r.answer, "{r:?}"),
                "colour_count" => {
                    let target = COLOURS.iter().find(|c| r.question.contains(&format!(" {} ", c.0))).map(|c| c.1);
                    let k = found.iter().filter(|b| Some(b.0) == target).count();
                    assert_eq!(k.to_string(), r.answer, "{r:?}");
                    assert_eq!(found.len(), item.shapes.len());
                }
                other => panic!("unknown family {other}"),
            }
        }
        assert_eq!(per_family.values().copied().collect::<Vec<_>>(), vec![100; 5]);
        assert_eq!(letters.len(), 4, "every answer letter occurs");
    }

    #[test]
    fn writes_pngs_quickly_and_rejects_bad_specs() {
        let dir = tempfile::tempdir().expect("tmp");
        let start = std::time::Instant::now();
        let records = write_synthetic(&SyntheticSpec { canvas: 84, ..spec(300) }, dir.path()).expect("write");
        assert!(start.elapsed().as_secs_f64() < 5.0, "took {:?}", start.elapsed());
        let png = image::open(dir.path().join(&records[7].images[0])).expect("png").to_rgb8();
        assert_eq!(png, generate_item(&SyntheticSpec { canvas: 84, ..spec(300) }, 7).image);
        assert!(generate(&SyntheticSpec { canvas: 60, ..spec(1) }).is_err());
        assert!(generate(&SyntheticSpec { canvas: 28, ..spec(1) }).is_err());
        assert!(generate(&SyntheticSpec { families: vec![], ..spec(1) }).is_err());
        assert_eq!("color".parse::<Family>(), Ok(Family::Colour));
        assert!("size".parse::<Family>().is_err());
    }
}

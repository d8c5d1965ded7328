//! Labelled images for the vision probes: an image folder (one subfolder per class, optionally
//! under `train/` and `val/` or `test/` as the paper's ImageFolder layout) or a MedMNIST `.npz`
//! (`train_images`, `train_labels`, `test_images`, `test_labels`).

use std::collections::BTreeMap;
use std::io::Read;
use std::path::{Path, PathBuf};

use image::RgbImage;
use rand::SeedableRng;
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use sha2::{Digest, Sha256};

use crate::error::{EvalError, Result};

/// File extensions read from an image folder (what the model's decoder handles).
pub const IMAGE_EXTENSIONS: [&str; 9] = ["png", "jpg", "jpeg", "bmp", "gif", "tif", "tiff", "webp", "jfif"];

/// Where one image's pixels are.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ImageSource {
    /// An encoded image file.
    File(PathBuf),
    /// Image `index` of a split of the loaded npz.
    Npz {
        /// Which array: `true` for `test_images`, `false` for `train_images`.
        test: bool,
        /// Row of the array.
        index: usize,
    },
}

/// One labelled image.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProbeImage {
    /// Class index into [`ProbeData::classes`].
    pub label: usize,
    /// Its pixels.
    pub source: ImageSource,
}

/// A uint8 image array from an npz: `count` images of `height x width x channels` (1 or 3).
#[derive(Debug, Clone, PartialEq, Eq)]
struct PixelArray {
    pixels: Vec<u8>,
    height: usize,
    width: usize,
    channels: usize,
}

impl PixelArray {
    fn image_len(&self) -> usize {
        self.height * self.width * self.channels
    }

    fn rgb(&self, index: usize) -> Option<RgbImage> {
        let n = self.image_len();
        let raw = self.pixels.get(index * n..(index + 1) * n)?;
        let rgb: Vec<u8> = if self.channels == 3 { raw.to_vec() } else { raw.iter().flat_map(|&v| [v, v, v]).collect() };
        RgbImage::from_raw(self.width as u32, self.height as u32, rgb)
    }
}

/// A probe data set: class names, a training split and an evaluation split.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProbeData {
    /// Class names; labels index them.
    pub classes: Vec<String>,
    /// Images the probe is fitted on.
    pub train: Vec<ProbeImage>,
    /// Images it is scored on.
    pub test: Vec<ProbeImage>,
    /// Human-readable origin, for reports.
    pub origin: String,
    npz: Option<(PixelArray, PixelArray)>,
}

impl ProbeData {
    /// Loads `path`: a `.npz` file or an image folder. A folder without `train/` is split per
    /// class, `val_fraction` of each class (at least one image when it has two) going to the
    /// evaluation split, drawn with `seed`.
    pub fn load(path: &Path, val_fraction: f64, seed: u64) -> Result<Self> {
        if path.is_file() {
            return load_npz(path);
        }
        if !path.is_dir() {
            return Err(EvalError::io(path, std::io::Error::new(std::io::ErrorKind::NotFound, "no such image folder or npz file")));
        }
        let train_dir = path.join("train");
        if train_dir.is_dir() {
            let eval_dir = ["val", "test"].iter().map(|d| path.join(d)).find(|d| d.is_dir()).ok_or_else(|| {
                EvalError::Data(format!("{} has train/ but neither val/ nor test/", path.display()))
            })?;
            let train = class_files(&train_dir)?;
            let eval = class_files(&eval_dir)?;
            let classes: Vec<String> = train.keys().cloned().collect();
            if let Some(extra) = eval.keys().find(|c| !train.contains_key(*c)) {
                return Err(EvalError::Data(format!("class {extra:?} of {} has no training folder", eval_dir.display())));
            }
            let label = |c: &String| classes.iter().position(|x| x == c).unwrap_or(0);
            let flatten = |m: &BTreeMap<String, Vec<PathBuf>>| -> Vec<ProbeImage> {
                m.iter().flat_map(|(c, files)| files.iter().map(move |f| ProbeImage { label: label(c), source: ImageSource::File(f.clone()) })).collect()
            };
            let data = ProbeData { train: flatten(&train), test: flatten(&eval), classes, origin: path.display().to_string(), npz: None };
            return data.checked();
        }
        if !(0.0..1.0).contains(&val_fraction) {
            return Err(EvalError::config("val_fraction", format!("expected a fraction in [0, 1), got {val_fraction}")));
        }
        let all = class_files(path)?;
        let classes: Vec<String> = all.keys().cloned().collect();
        let mut rng = StdRng::seed_from_u64(seed);
        let (mut train, mut test) = (Vec::new(), Vec::new());
        for (label, files) in all.values().enumerate() {
            let mut files = files.clone();
            files.shuffle(&mut rng);
            let mut held = (files.len() as f64 * val_fraction).round() as usize;
            if held == 0 && files.len() >= 2 && val_fraction > 0.0 {
                held = 1;
            }
            for (i, f) in files.into_iter().enumerate() {
                let img = ProbeImage { label, source: ImageSource::File(f) };
                if i < held { test.push(img) } else { train.push(img) }
            }
        }
        ProbeData { classes, train, test, origin: path.display().to_string(), npz: None }.checked()
    }

    fn checked(self) -> Result<Self> {
        if self.classes.len() < 2 {
            return Err(EvalError::Data(format!("{}: a probe needs at least 2 classes, found {}", self.origin, self.classes.len())));
        }
        if self.train.is_empty() || self.test.is_empty() {
            return Err(EvalError::Data(format!(
                "{}: {} training and {} evaluation images; both splits need images",
                self.origin,
                self.train.len(),
                self.test.len()
            )));
        }
        Ok(self)
    }

    /// Decodes one image to 8-bit RGB.
    pub fn rgb(&self, image: &ProbeImage) -> Result<RgbImage> {
        match &image.source {
            ImageSource::File(path) => {
                let bytes = std::fs::read(path).map_err(|e| EvalError::io(path, e))?;
                let decoded = medrl_model::image::decode_image(&bytes, &path.display().to_string())?;
                Ok(medrl_model::image::convert_to_rgb(&decoded))
            }
            ImageSource::Npz { test, index } => self
                .array(*test)
                .and_then(|a| a.rgb(*index))
                .ok_or_else(|| EvalError::Data(format!("npz image {index} of the {} split does not exist", if *test { "test" } else { "train" }))),
        }
    }

    /// A content hash of the image (file bytes, or npz pixels and shape), for the feature cache.
    pub fn content_key(&self, image: &ProbeImage) -> Result<String> {
        let mut h = Sha256::new();
        match &image.source {
            ImageSource::File(path) => h.update(std::fs::read(path).map_err(|e| EvalError::io(path, e))?),
            ImageSource::Npz { test, index } => {
                let a = self.array(*test).ok_or_else(|| EvalError::Data("npz pixels missing".into()))?;
                let n = a.image_len();
                let raw = a.pixels.get(index * n..(index + 1) * n).ok_or_else(|| EvalError::Data(format!("npz image {index} does not exist")))?;
                h.update(format!("npz {}x{}x{}:", a.height, a.width, a.channels));
                h.update(raw);
            }
        }
        Ok(hex::encode(h.finalize()))
    }

    fn array(&self, test: bool) -> Option<&PixelArray> {
        self.npz.as_ref().map(|(train, eval)| if test { eval } else { train })
    }
}

/// Image files per class subfolder of `dir`, class names sorted as torchvision's ImageFolder.
fn class_files(dir: &Path) -> Result<BTreeMap<String, Vec<PathBuf>>> {
    let io = |e| EvalError::io(dir, e);
    let mut out = BTreeMap::new();
    for entry in std::fs::read_dir(dir).map_err(io)? {
        let entry = entry.map_err(io)?;
        let path = entry.path();
        if !path.is_dir() {
            continue;
        }
        let name = entry.file_name().to_string_lossy().into_owned();
        let mut files: Vec<PathBuf> = std::fs::read_dir(&path)
            .map_err(|e| EvalError::io(&path, e))?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.is_file() && p.extension().and_then(|x| x.to_str()).is_some_and(|x| IMAGE_EXTENSIONS.contains(&x.to_ascii_lowercase().as_str())))
            .collect();
        files.sort();
        if files.is_empty() {
            tracing::warn!("{}: class folder without images, skipped", path.display());
            continue;
        }
        out.insert(name, files);
    }
    if out.is_empty() {
        return Err(EvalError::Data(format!("{}: no class subfolders with images", dir.display())));
    }
    Ok(out)
}

/// Reads one member of an npz archive (`name` without `.npy`) into memory.
fn npz_member(archive: &mut zip::ZipArchive<std::fs::File>, path: &Path, name: &str) -> Result<Vec<u8>> {
    let mut file = archive
        .by_name(&format!("{name}.npy"))
        .map_err(|e| EvalError::Data(format!("{}: array `{name}`: {e}", path.display())))?;
    let mut bytes = Vec::with_capacity(usize::try_from(file.size()).unwrap_or(0));
    file.read_to_end(&mut bytes).map_err(|e| EvalError::io(path, e))?;
    Ok(bytes)
}

fn npy_error(path: &Path, name: &str, problem: impl std::fmt::Display) -> EvalError {
    EvalError::Data(format!("{}: array `{name}`: {problem}", path.display()))
}

/// An image array: uint8, `(N, H, W)` or `(N, H, W, 1 | 3)`, C order.
fn read_images(bytes: &[u8], path: &Path, name: &str) -> Result<PixelArray> {
    let npy = npyz::NpyFile::new(bytes).map_err(|e| npy_error(path, name, e))?;
    if npy.order() != npyz::Order::C {
        return Err(npy_error(path, name, "Fortran-ordered arrays are not supported"));
    }
    let shape: Vec<usize> = npy.shape().iter().map(|&d| d as usize).collect();
    let (height, width, channels) = match shape.as_slice() {
        [_, h, w] => (*h, *w, 1),
        [_, h, w, c] if *c == 1 || *c == 3 => (*h, *w, *c),
        other => return Err(npy_error(path, name, format!("expected shape (N, H, W) or (N, H, W, 1|3), found {other:?}"))),
    };
    let pixels: Vec<u8> = npy.into_vec().map_err(|e| npy_error(path, name, format!("expected uint8 pixels: {e}")))?;
    Ok(PixelArray { pixels, height, width, channels })
}

/// A label array: integers, `(N,)` or `(N, 1)`; multi-label `(N, C)` arrays are refused since
/// the probes are single-label classifiers (MedMNIST's ChestMNIST is multi-label).
fn read_labels(bytes: &[u8], path: &Path, name: &str) -> Result<Vec<usize>> {
    let npy = npyz::NpyFile::new(bytes).map_err(|e| npy_error(path, name, e))?;
    match npy.shape() {
        [_] | [_, 1] => {}
        other => return Err(npy_error(path, name, format!("expected one label per image, shape (N,) or (N, 1), found {other:?} (multi-label data is not supported)"))),
    }
    let values: Vec<i64> = match npy.try_data::<u8>() {
        Ok(r) => r.map(|v| v.map(i64::from)).collect::<std::io::Result<_>>(),
        Err(npy) => match npy.try_data::<i64>() {
            Ok(r) => r.collect::<std::io::Result<_>>(),
            Err(npy) => match npy.try_data::<i32>() {
                Ok(r) => r.map(|v| v.map(i64::from)).collect::<std::io::Result<_>>(),
                Err(npy) => return Err(npy_error(path, name, format!("labels must be uint8, int32 or int64, found {}", npy.dtype().descr()))),
            },
        },
    }
    .map_err(|e| npy_error(path, name, e))?;
    values.into_iter().map(|v| usize::try_from(v).map_err(|_| npy_error(path, name, format!("negative label {v}")))).collect()
}

/// Class names of an npz: MedMNIST's (from the vqa crate's flag table) when the file is named
/// like a MedMNIST download and the label count fits, else the label numbers.
fn class_names(path: &Path, count: usize) -> Vec<String> {
    let file_name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    match medrl_vqa::datasets::medmnist::Flag::from_file_name(&file_name) {
        Some((flag, _)) if flag.labels().len() >= count => flag.labels().iter().map(|s| (*s).to_owned()).collect(),
        _ => (0..count).map(|c| c.to_string()).collect(),
    }
}

fn load_npz(path: &Path) -> Result<ProbeData> {
    let file = std::fs::File::open(path).map_err(|e| EvalError::io(path, e))?;
    let mut archive = zip::ZipArchive::new(file).map_err(|e| EvalError::Data(format!("{}: not a readable npz (zip) file: {e}", path.display())))?;
    let mut split = |images: &str, labels: &str| -> Result<(PixelArray, Vec<usize>)> {
        let pixels = read_images(&npz_member(&mut archive, path, images)?, path, images)?;
        let labels_v = read_labels(&npz_member(&mut archive, path, labels)?, path, labels)?;
        let count = pixels.pixels.len() / pixels.image_len().max(1);
        if count != labels_v.len() {
            return Err(npy_error(path, labels, format!("{} labels for {count} images in `{images}`", labels_v.len())));
        }
        Ok((pixels, labels_v))
    };
    let (train_px, train_y) = split("train_images", "train_labels")?;
    let (test_px, test_y) = split("test_images", "test_labels")?;
    let count = train_y.iter().chain(&test_y).max().map_or(0, |m| m + 1);
    let classes = class_names(path, count);
    let images = |labels: &[usize], test: bool| -> Vec<ProbeImage> {
        labels.iter().enumerate().map(|(index, &label)| ProbeImage { label, source: ImageSource::Npz { test, index } }).collect()
    };
    ProbeData {
        classes,
        train: images(&train_y, false),
        test: images(&test_y, true),
        origin: path.display().to_string(),
        npz: Some((train_px, test_px)),
    }
    .checked()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn save(path: &Path, v: u8) -> Result<()> {
        std::fs::create_dir_all(path.parent().unwrap_or(Path::new("."))).map_err(|e| EvalError::io(path, e))?;
        RgbImage::from_pixel(8, 8, image::Rgb([v, v, v])).save(path).map_err(|e| EvalError::Data(e.to_string()))
    }

    #[test]
    fn folder_without_split_is_split_per_class() -> Result<()> {
        let dir = tempfile::tempdir().map_err(|e| EvalError::io("tempdir", e))?;
        for c in ["cat", "dog"] {
            for i in 0..5 {
                save(&dir.path().join(c).join(format!("{i}.png")), i * 10)?;
            }
        }
        std::fs::write(dir.path().join("cat/notes.txt"), "x").map_err(|e| EvalError::io("txt", e))?;
        let d = ProbeData::load(dir.path(), 0.2, 0)?;
        assert_eq!(d.classes, ["cat", "dog"]);
        assert_eq!((d.train.len(), d.test.len()), (8, 2));
        assert_eq!(d.test.iter().filter(|i| i.label == 1).count(), 1);
        assert_eq!(d.rgb(&d.test[0])?.dimensions(), (8, 8));
        Ok(())
    }

    #[test]
    fn folder_with_train_and_val() -> Result<()> {
        let dir = tempfile::tempdir().map_err(|e| EvalError::io("tempdir", e))?;
        for (split, n) in [("train", 3), ("val", 1)] {
            for c in ["a", "b"] {
                for i in 0..n {
                    save(&dir.path().join(split).join(c).join(format!("{i}.png")), i as u8)?;
                }
            }
        }
        let d = ProbeData::load(dir.path(), 0.2, 0)?;
        assert_eq!((d.train.len(), d.test.len()), (6, 2));
        assert_ne!(d.content_key(&d.train[0])?, d.content_key(&d.train[1])?);
        Ok(())
    }
}

//! MedMNIST v2 / MedMNIST+ `.npz` files (the 12 2-D flags at 28, 64, 128 or 224 px) turned into
//! multiple-choice VQA records with PNG images (`datasets.md` §2; the conversion itself is our
//! design, `paper-recipe.md` §13).
//!
//! - **Question**: one per flag, naming the modality (a chest X-ray, an H&E patch, ...).
//! - **Options**: the flag's class names (`INFO[flag]["label"]`), all of them, or the answer plus
//!   `max_options - 1` distractors drawn with the seed; shuffled with the seed (one stream per
//!   item, so an item's options do not depend on which other items were drawn).
//! - **Sampling**: the split's items are grouped by class and shares are filled evenly
//!   ([`balanced_quotas`]), so rare classes are not drowned by common ones.
//! - **ChestMNIST** (multi-label, 14 findings): a single-answer question needs exactly one true
//!   option. Images with exactly one positive finding ask "which finding is present" with that
//!   finding as the answer; images with none answer an extra option "no finding"; images with
//!   two or more findings are skipped and counted ([`MedMnistReport::skipped_multi_finding`]).
//!   Every distractor is then a finding the label file marks absent.
//! - **RetinaMNIST** (ordinal DR grade 0-4): options are the grades with their international
//!   clinical DR scale names and are never shuffled, so option order is grade order and a
//!   near miss stays visible as a neighbouring letter; scoring is still exact match.
//!
//! Only the drawn items are decoded and written: labels are read first, then the image array is
//! streamed once up to the last drawn index, so a 224 px training split never sits in memory.

use std::fmt;
use std::fs::File;
use std::io::{BufReader, Read};
use std::path::{Path, PathBuf};
use std::str::FromStr;

use npyz::{DType, NpyFile, Order, TypeChar};
use rand::SeedableRng;
use rand::seq::{IndexedRandom, SliceRandom};
use rand_chacha::ChaCha8Rng;

use crate::record::VqaRecord;
use crate::template::option_letter;

use super::DataError;
use super::subset::balanced_quotas;

/// The 11 organs of OrganAMNIST / OrganCMNIST / OrganSMNIST, in class order.
const ORGANS: &[&str] = &[
    "bladder", "femur-left", "femur-right", "heart", "kidney-left", "kidney-right", "liver", "lung-left", "lung-right", "pancreas", "spleen",
];

/// The 14 ChestMNIST findings, in label-column order.
const CHEST_FINDINGS: &[&str] = &[
    "atelectasis", "cardiomegaly", "effusion", "infiltration", "mass", "nodule", "pneumonia", "pneumothorax", "consolidation", "edema", "emphysema",
    "fibrosis", "pleural", "hernia",
];

/// The option ChestMNIST images without any positive finding answer.
pub const NO_FINDING: &str = "no finding";

/// One of the 12 two-dimensional MedMNIST datasets.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Flag {
    /// `pathmnist`: colorectal H&E histology, 9 tissue classes.
    Path,
    /// `chestmnist`: NIH ChestX-ray14, 14 binary findings (multi-label).
    Chest,
    /// `dermamnist`: HAM10000 dermatoscopy, 7 lesion classes.
    Derma,
    /// `octmnist`: retinal OCT, 4 classes.
    Oct,
    /// `pneumoniamnist`: pediatric chest X-ray, normal / pneumonia.
    Pneumonia,
    /// `retinamnist`: fundus photographs, DR grade 0-4 (ordinal).
    Retina,
    /// `breastmnist`: breast ultrasound, malignant / normal-or-benign.
    Breast,
    /// `bloodmnist`: blood-cell microscopy, 8 classes.
    Blood,
    /// `tissuemnist`: kidney cortex microscopy, 8 classes.
    Tissue,
    /// `organamnist`: abdominal CT, axial, 11 organs.
    OrganA,
    /// `organcmnist`: abdominal CT, coronal, 11 organs.
    OrganC,
    /// `organsmnist`: abdominal CT, sagittal, 11 organs.
    OrganS,
}

/// How a flag's labels are laid out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Task {
    /// One class index per image.
    MultiClass,
    /// One 0/1 column per finding (ChestMNIST).
    MultiLabel,
    /// One grade per image, where order matters (RetinaMNIST).
    Ordinal,
}

impl Flag {
    /// Every 2-D flag.
    pub const ALL: [Flag; 12] = [
        Flag::Path,
        Flag::Chest,
        Flag::Derma,
        Flag::Oct,
        Flag::Pneumonia,
        Flag::Retina,
        Flag::Breast,
        Flag::Blood,
        Flag::Tissue,
        Flag::OrganA,
        Flag::OrganC,
        Flag::OrganS,
    ];

    /// The flag as MedMNIST spells it (`pathmnist`).
    pub fn name(self) -> &'static str {
        match self {
            Self::Path => "pathmnist",
            Self::Chest => "chestmnist",
            Self::Derma => "dermamnist",
            Self::Oct => "octmnist",
            Self::Pneumonia => "pneumoniamnist",
            Self::Retina => "retinamnist",
            Self::Breast => "breastmnist",
            Self::Blood => "bloodmnist",
            Self::Tissue => "tissuemnist",
            Self::OrganA => "organamnist",
            Self::OrganC => "organcmnist",
            Self::OrganS => "organsmnist",
        }
    }

    /// The label layout.
    pub fn task(self) -> Task {
        match self {
            Self::Chest => Task::MultiLabel,
            Self::Retina => Task::Ordinal,
            _ => Task::MultiClass,
        }
    }

    /// The class names of `INFO[flag]["label"]`, in index order (commas inside a name are part
    /// of it: breastmnist "normal, benign" is one class).
    pub fn labels(self) -> &'static [&'static str] {
        match self {
            Self::Path => &[
                "adipose",
                "background",
                "debris",
                "lymphocytes",
                "mucus",
                "smooth muscle",
                "normal colon mucosa",
                "cancer-associated stroma",
                "colorectal adenocarcinoma epithelium",
            ],
            Self::Chest => CHEST_FINDINGS,
            Self::Derma => &[
                "actinic keratoses and intraepithelial carcinoma",
                "basal cell carcinoma",
                "benign keratosis-like lesions",
                "dermatofibroma",
                "melanoma",
                "melanocytic nevi",
                "vascular lesions",
            ],
            Self::Oct => &["choroidal neovascularization", "diabetic macular edema", "drusen", "normal"],
            Self::Pneumonia => &["normal", "pneumonia"],
            Self::Retina => &["0", "1", "2", "3", "4"],
            Self::Breast => &["malignant", "normal, benign"],
            Self::Blood => &[
                "basophil",
                "eosinophil",
                "erythroblast",
                "immature granulocytes(myelocytes, metamyelocytes and promyelocytes)",
                "lymphocyte",
                "monocyte",
                "neutrophil",
                "platelet",
            ],
            Self::Tissue => &[
                "Collecting Duct, Connecting Tubule",
                "Distal Convoluted Tubule",
                "Glomerular endothelial cells",
                "Interstitial endothelial cells",
                "Leukocytes",
                "Podocytes",
                "Proximal Tubule Segments",
                "Thick Ascending Limb",
            ],
            Self::OrganA | Self::OrganC | Self::OrganS => ORGANS,
        }
    }

    /// The answer options, one per question class: the label names, plus [`NO_FINDING`] for
    /// ChestMNIST, and the grades with their clinical scale names for RetinaMNIST.
    pub fn option_names(self) -> Vec<&'static str> {
        match self {
            Self::Chest => CHEST_FINDINGS.iter().copied().chain([NO_FINDING]).collect(),
            // International clinical diabetic retinopathy severity scale, the grading DeepDRiD
            // (RetinaMNIST's source) uses; the bare digits of INFO would mean nothing to a model.
            Self::Retina => vec![
                "grade 0: no apparent retinopathy",
                "grade 1: mild non-proliferative retinopathy",
                "grade 2: moderate non-proliferative retinopathy",
                "grade 3: severe non-proliferative retinopathy",
                "grade 4: proliferative retinopathy",
            ],
            other => other.labels().to_vec(),
        }
    }

    /// The record's `modality` (`datasets.md` §2.3), the unit of per-modality metrics.
    pub fn modality(self) -> &'static str {
        match self {
            Self::Path => "histology",
            Self::Chest | Self::Pneumonia => "X-ray",
            Self::Derma => "dermatoscopy",
            Self::Oct => "OCT",
            Self::Retina => "fundus photography",
            Self::Breast => "ultrasound",
            Self::Blood | Self::Tissue => "microscopy",
            Self::OrganA | Self::OrganC | Self::OrganS => "CT",
        }
    }

    /// The question asked of every image of the flag.
    pub fn question(self) -> &'static str {
        match self {
            Self::Path => "Which tissue type does this H&E-stained colorectal histology patch show?",
            Self::Chest => "Which of these findings is present in this chest X-ray?",
            Self::Derma => "Which type of skin lesion does this dermatoscopic image show?",
            Self::Oct => "What is the diagnosis for this retinal OCT scan?",
            Self::Pneumonia => "What is the diagnosis for this pediatric chest X-ray?",
            Self::Retina => "What is the diabetic retinopathy grade of this fundus photograph?",
            Self::Breast => "What does this breast ultrasound image show?",
            Self::Blood => "Which type of blood cell does this microscopy image show?",
            Self::Tissue => "Which kidney cortex cell type does this microscopy image show?",
            Self::OrganA => "Which organ is shown in this axial abdominal CT image?",
            Self::OrganC => "Which organ is shown in this coronal abdominal CT image?",
            Self::OrganS => "Which organ is shown in this sagittal abdominal CT image?",
        }
    }

    /// Flag and image size from a MedMNIST file name: `{flag}.npz` (28 px) or
    /// `{flag}_{size}.npz` with size 64, 128 or 224.
    pub fn from_file_name(name: &str) -> Option<(Flag, u32)> {
        let stem = name.strip_suffix(".npz")?;
        let (flag, size) = match stem.rsplit_once('_') {
            Some((flag, size)) => (flag, size.parse().ok().filter(|s| [64, 128, 224].contains(s))?),
            None => (stem, 28),
        };
        Some((flag.parse().ok()?, size))
    }
}

impl FromStr for Flag {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Flag::ALL.into_iter().find(|f| f.name() == s).ok_or_else(|| {
            let names: Vec<&str> = Flag::ALL.iter().map(|f| f.name()).collect();
            format!("unknown MedMNIST flag {s:?}; expected one of {}", names.join(", "))
        })
    }
}

impl fmt::Display for Flag {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// A MedMNIST split (the prefix of its npz keys).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Split {
    /// `train_images` / `train_labels`.
    Train,
    /// `val_images` / `val_labels`.
    Val,
    /// `test_images` / `test_labels`.
    #[default]
    Test,
}

impl Split {
    /// The key prefix (`train`, `val`, `test`).
    pub fn name(self) -> &'static str {
        match self {
            Self::Train => "train",
            Self::Val => "val",
            Self::Test => "test",
        }
    }
}

impl FromStr for Split {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "train" => Ok(Self::Train),
            "val" => Ok(Self::Val),
            "test" => Ok(Self::Test),
            other => Err(format!("unknown split {other:?}; expected train, val or test")),
        }
    }
}

/// How to turn one split of one file into records.
#[derive(Debug, Clone)]
pub struct MedMnistOptions {
    /// The flag; `None` reads it from the file name.
    pub flag: Option<Flag>,
    /// Which split.
    pub split: Split,
    /// Records wanted, shared evenly over classes; `None` takes every usable item.
    pub size: Option<usize>,
    /// Most options per question (at least 2); `None` offers every class.
    pub max_options: Option<usize>,
    /// Seed of the sampling and of the option order.
    pub seed: u64,
    /// Folder the PNGs are written to (created): `<image_dir>/<file stem>/<split>/<index>.png`.
    pub image_dir: PathBuf,
    /// How records refer to `image_dir` (relative to the output JSONL's folder, or absolute).
    pub image_prefix: String,
}

/// One class of a conversion.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClassCount {
    /// The option name of the class.
    pub name: String,
    /// Usable items of the split in this class.
    pub available: usize,
    /// Items drawn.
    pub taken: usize,
}

/// What a conversion read and wrote.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MedMnistReport {
    /// The npz file.
    pub file: PathBuf,
    /// Its flag.
    pub flag: Flag,
    /// Image height and width in pixels.
    pub pixels: (usize, usize),
    /// The split.
    pub split: Split,
    /// Items in the split.
    pub items: usize,
    /// ChestMNIST images with two or more findings, which have no single answer (0 otherwise).
    pub skipped_multi_finding: usize,
    /// Per class, in class order.
    pub classes: Vec<ClassCount>,
    /// PNG files written.
    pub written: usize,
}

impl fmt::Display for MedMnistReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "{} ({}, {}x{} px, {} split): {} items, {} drawn, {} PNG written",
            self.file.display(),
            self.flag,
            self.pixels.0,
            self.pixels.1,
            self.split.name(),
            self.items,
            self.classes.iter().map(|c| c.taken).sum::<usize>(),
            self.written
        )?;
        if self.skipped_multi_finding > 0 {
            writeln!(f, "  skipped {} images with two or more findings (no single answer)", self.skipped_multi_finding)?;
        }
        for c in &self.classes {
            writeln!(f, "  {:>7} of {:>7}  {}", c.taken, c.available, c.name)?;
        }
        Ok(())
    }
}

/// An npz archive opened for reading its arrays.
struct Npz {
    path: PathBuf,
    archive: zip::ZipArchive<BufReader<File>>,
}

impl Npz {
    fn open(path: &Path) -> Result<Self, DataError> {
        let file = File::open(path).map_err(|e| DataError::io(path, e))?;
        let archive = zip::ZipArchive::new(BufReader::new(file)).map_err(|e| DataError::file(path, format!("not an npz (zip) archive: {e}")))?;
        Ok(Self { path: path.to_path_buf(), archive })
    }

    /// The array stored under `key` (`np.savez` names the member `key.npy`), header parsed.
    fn array(&mut self, key: &str) -> Result<NpyFile<zip::read::ZipFile<'_, BufReader<File>>>, DataError> {
        let path = self.path.clone();
        let member = format!("{key}.npy");
        if self.archive.index_for_name(&member).is_none() {
            let keys: Vec<String> = self.archive.file_names().filter_map(Result::ok).map(|n| n.trim_end_matches(".npy").to_owned()).collect();
            return Err(DataError::file(&path, format!("no array `{key}`; the file has {keys:?}")));
        }
        let entry = self.archive.by_name(&member).map_err(|e| DataError::file(&path, format!("array `{key}`: {e}")))?;
        let npy = NpyFile::new(entry).map_err(|e| DataError::file(&path, format!("array `{key}`: bad npy header: {e}")))?;
        if npy.order() != Order::C && npy.shape().iter().filter(|&&d| d > 1).count() > 1 {
            return Err(DataError::file(&path, format!("array `{key}` is in Fortran order; save it C-contiguous")));
        }
        Ok(npy)
    }
}

/// The integer type of an npy array, or why it is not one.
fn integer_kind(dtype: &DType) -> Result<(TypeChar, u64), String> {
    match dtype {
        DType::Plain(t) if matches!(t.type_char(), TypeChar::Int | TypeChar::Uint) => Ok((t.type_char(), t.size_field())),
        other => Err(format!("expected an integer array, found dtype {}", other.descr())),
    }
}

/// Reads every element of an integer npy array as `i64`.
fn read_integers<R: Read>(npy: NpyFile<R>) -> Result<Vec<i64>, String> {
    fn widen<T, R>(npy: NpyFile<R>) -> Result<Vec<i64>, String>
    where
        T: npyz::Deserialize + TryInto<i64> + Copy + fmt::Display,
        R: Read,
    {
        let data = npy.data::<T>().map_err(|e| e.to_string())?;
        data.map(|v| {
            let v = v.map_err(|e| e.to_string())?;
            v.try_into().map_err(|_| format!("value {v} does not fit in i64"))
        })
        .collect()
    }
    match integer_kind(&npy.dtype())? {
        (TypeChar::Uint, 1) => widen::<u8, R>(npy),
        (TypeChar::Uint, 2) => widen::<u16, R>(npy),
        (TypeChar::Uint, 4) => widen::<u32, R>(npy),
        (TypeChar::Uint, 8) => widen::<u64, R>(npy),
        (TypeChar::Int, 1) => widen::<i8, R>(npy),
        (TypeChar::Int, 2) => widen::<i16, R>(npy),
        (TypeChar::Int, 4) => widen::<i32, R>(npy),
        (TypeChar::Int, 8) => widen::<i64, R>(npy),
        (kind, size) => Err(format!("unsupported integer type {kind:?} of {size} bytes")),
    }
}

/// The question class of every item (`None` for a skipped ChestMNIST image), from the labels.
fn classes_of(path: &Path, key: &str, flag: Flag, shape: &[u64], values: &[i64]) -> Result<Vec<Option<usize>>, DataError> {
    let n = shape.first().copied().unwrap_or(0) as usize;
    let width = match shape {
        [_] => 1,
        [_, w] => *w as usize,
        _ => return Err(DataError::file(path, format!("`{key}` has shape {shape:?}; expected (N, L)"))),
    };
    let names = flag.labels();
    let bad = |i: usize, problem: String| DataError::field(path, i, key, problem);
    match flag.task() {
        Task::MultiLabel => {
            if width != names.len() {
                return Err(DataError::file(path, format!("`{key}` has {width} columns; {flag} has {} findings", names.len())));
            }
            let mut out = Vec::with_capacity(n);
            for (i, row) in values.chunks_exact(width).enumerate() {
                if let Some(v) = row.iter().find(|v| !matches!(v, 0 | 1)) {
                    return Err(bad(i, format!("finding value {v}; expected 0 or 1")));
                }
                let positives: Vec<usize> = (0..width).filter(|&j| row[j] == 1).collect();
                out.push(match positives[..] {
                    [] => Some(names.len()),
                    [j] => Some(j),
                    _ => None,
                });
            }
            Ok(out)
        }
        Task::MultiClass | Task::Ordinal => {
            if width != 1 {
                return Err(DataError::file(path, format!("`{key}` has {width} columns; {flag} is single-label")));
            }
            values
                .iter()
                .enumerate()
                .map(|(i, &v)| match usize::try_from(v) {
                    Ok(c) if c < names.len() => Ok(Some(c)),
                    _ => Err(bad(i, format!("class {v} outside 0..{}", names.len()))),
                })
                .collect()
        }
    }
}

/// The options of one item and the index of its answer among them.
fn options_for(flag: Flag, class: usize, max_options: Option<usize>, rng: &mut ChaCha8Rng) -> (Vec<&'static str>, usize) {
    let names = flag.option_names();
    let mut chosen: Vec<usize> = match max_options {
        Some(k) if k < names.len() => {
            let others: Vec<usize> = (0..names.len()).filter(|&c| c != class).collect();
            let mut pick: Vec<usize> = others.choose_multiple(rng, k.saturating_sub(1)).copied().collect();
            pick.push(class);
            pick
        }
        _ => (0..names.len()).collect(),
    };
    if flag.task() == Task::Ordinal {
        chosen.sort_unstable();
    } else {
        chosen.shuffle(rng);
    }
    let answer = chosen.iter().position(|&c| c == class).unwrap_or(0);
    (chosen.into_iter().map(|c| names[c]).collect(), answer)
}

/// Reads one split of a MedMNIST npz, draws a class-balanced sample, writes its PNGs and returns
/// the records (in index order) with a report.
pub fn load_medmnist(npz_path: &Path, opts: &MedMnistOptions) -> Result<(Vec<VqaRecord>, MedMnistReport), DataError> {
    let file_name = npz_path.file_name().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default();
    let flag = match opts.flag {
        Some(f) => f,
        None => Flag::from_file_name(&file_name)
            .map(|(f, _)| f)
            .ok_or_else(|| DataError::file(npz_path, "cannot tell the flag from the file name ({flag}.npz or {flag}_{size}.npz); give it explicitly"))?,
    };
    if matches!(opts.max_options, Some(k) if k < 2) {
        return Err(DataError::Invalid("max_options must be at least 2".into()));
    }
    let stem = file_name.strip_suffix(".npz").unwrap_or(&file_name).to_owned();
    let split = opts.split.name();
    let mut npz = Npz::open(npz_path)?;

    let labels_key = format!("{split}_labels");
    let labels = npz.array(&labels_key)?;
    let label_shape = labels.shape().to_vec();
    let values = read_integers(labels).map_err(|p| DataError::file(npz_path, format!("`{labels_key}`: {p}")))?;
    let classes = classes_of(npz_path, &labels_key, flag, &label_shape, &values)?;

    // Group usable items by class and fill the class shares evenly.
    let names = flag.option_names();
    let mut members: Vec<Vec<usize>> = vec![Vec::new(); names.len()];
    for (i, c) in classes.iter().enumerate() {
        if let Some(c) = c {
            members[*c].push(i);
        }
    }
    let available: Vec<usize> = members.iter().map(Vec::len).collect();
    let quotas = balanced_quotas(&available, opts.size.unwrap_or(usize::MAX));
    let mut rng = ChaCha8Rng::seed_from_u64(opts.seed);
    let mut drawn: Vec<(usize, usize)> = Vec::new();
    for (class, (group, quota)) in members.iter_mut().zip(&quotas).enumerate() {
        group.shuffle(&mut rng);
        drawn.extend(group[..*quota].iter().map(|&i| (i, class)));
    }
    drawn.sort_unstable();

    let images_key = format!("{split}_images");
    let images = npz.array(&images_key)?;
    let shape = images.shape().to_vec();
    let (n, h, w, channels) = match shape[..] {
        [n, h, w] => (n, h, w, 1),
        [n, h, w, 3] => (n, h, w, 3),
        _ => return Err(DataError::file(npz_path, format!("`{images_key}` has shape {shape:?}; expected (N, H, W) or (N, H, W, 3)"))),
    };
    if n as usize != classes.len() {
        return Err(DataError::file(npz_path, format!("`{images_key}` has {n} images but `{labels_key}` has {} rows", classes.len())));
    }
    match integer_kind(&images.dtype()) {
        Ok((TypeChar::Uint, 1)) => {}
        _ => return Err(DataError::file(npz_path, format!("`{images_key}` has dtype {}; expected uint8", images.dtype().descr()))),
    }
    let (h, w) = (h as usize, w as usize);
    let item_bytes = h * w * channels;

    let out_dir = opts.image_dir.join(&stem).join(split);
    std::fs::create_dir_all(&out_dir).map_err(|e| DataError::io(&out_dir, e))?;
    let mut reader = images.into_inner();
    let mut buf = vec![0u8; item_bytes];
    let mut next = 0usize;
    let mut records = Vec::with_capacity(drawn.len());
    for &(index, class) in &drawn {
        // Decompression is sequential: skip the items between drawn ones without keeping them.
        let skip = ((index - next) * item_bytes) as u64;
        let skipped = std::io::copy(&mut (&mut reader).take(skip), &mut std::io::sink()).map_err(|e| DataError::io(npz_path, e))?;
        if skipped != skip {
            return Err(DataError::field(npz_path, index, &images_key, "array ends early"));
        }
        reader.read_exact(&mut buf).map_err(|e| DataError::field(npz_path, index, &images_key, format!("cannot read image data: {e}")))?;
        next = index + 1;

        let png = out_dir.join(format!("{index}.png"));
        let saved = if channels == 1 {
            image::GrayImage::from_raw(w as u32, h as u32, buf.clone()).map(|img| img.save(&png))
        } else {
            image::RgbImage::from_raw(w as u32, h as u32, buf.clone()).map(|img| img.save(&png))
        };
        match saved {
            Some(Ok(())) => {}
            Some(Err(e)) => return Err(DataError::io(&png, std::io::Error::other(e))),
            None => return Err(DataError::Invalid(format!("{h}x{w}x{channels} image does not fit a PNG buffer"))),
        }

        let mut item_rng = ChaCha8Rng::seed_from_u64(opts.seed);
        item_rng.set_stream(index as u64 + 1);
        let (options, answer) = options_for(flag, class, opts.max_options, &mut item_rng);
        let prefix = opts.image_prefix.trim_end_matches('/');
        let image = if prefix.is_empty() { format!("{stem}/{split}/{index}.png") } else { format!("{prefix}/{stem}/{split}/{index}.png") };
        records.push(VqaRecord {
            id: format!("{stem}/{split}/{index}"),
            dataset: flag.name().into(),
            modality: flag.modality().into(),
            images: vec![image],
            question: flag.question().into(),
            answer_label: option_letter(answer).map(String::from),
            answer: options[answer].into(),
            options: options.into_iter().map(String::from).collect(),
        });
    }

    let report = MedMnistReport {
        file: npz_path.to_path_buf(),
        flag,
        pixels: (h, w),
        split: opts.split,
        items: classes.len(),
        skipped_multi_finding: classes.iter().filter(|c| c.is_none()).count(),
        classes: names.iter().zip(available.iter().zip(&quotas)).map(|(name, (&a, &t))| ClassCount { name: (*name).into(), available: a, taken: t }).collect(),
        written: records.len(),
    };
    Ok((records, report))
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;
    use std::io::Write;

    use npyz::WriterBuilder;

    use super::*;

    /// The bytes of an npy array of `shape` holding `data`.
    fn npy<T: npyz::Serialize + npyz::AutoSerialize + Copy>(shape: &[u64], data: &[T]) -> Vec<u8> {
        let mut out = Vec::new();
        let mut w = npyz::WriteOptions::<T>::new().default_dtype().shape(shape).writer(&mut out).begin_nd().expect("npy writer");
        w.extend(data.iter().copied()).expect("npy data");
        w.finish().expect("npy finish");
        out
    }

    /// Writes an npz the way `np.savez_compressed` does: deflated `key.npy` members.
    fn npz(path: &Path, members: &[(&str, Vec<u8>)]) {
        let mut zip = zip::ZipWriter::new(File::create(path).expect("create npz"));
        let opts = zip::write::SimpleFileOptions::default().compression_method(zip::CompressionMethod::Deflated);
        for (key, bytes) in members {
            zip.start_file(format!("{key}.npy"), opts).expect("member");
            zip.write_all(bytes).expect("member bytes");
        }
        zip.finish().expect("finish npz");
    }

    /// Image `i` of a fake RGB split: every pixel encodes the index, so PNGs can be traced back.
    fn pixel(i: usize, y: usize, x: usize, c: usize) -> u8 {
        (i * 7 + y * 3 + x + c * 50) as u8
    }

    /// A pathmnist-like file: 30 RGB 8x8 test images, class = i % 9 except a skew to class 0.
    fn path_npz(dir: &Path) -> PathBuf {
        let n = 30;
        let labels: Vec<u8> = (0..n).map(|i| if i < 12 { 0 } else { (i % 9) as u8 }).collect();
        let mut images = Vec::new();
        for i in 0..n {
            for y in 0..8 {
                for x in 0..8 {
                    for c in 0..3 {
                        images.push(pixel(i, y, x, c));
                    }
                }
            }
        }
        let path = dir.join("pathmnist_64.npz");
        npz(&path, &[("test_images", npy(&[n as u64, 8, 8, 3], &images)), ("test_labels", npy(&[n as u64, 1], &labels)), ("train_labels", npy(&[1, 1], &[0u8]))]);
        path
    }

    fn opts(dir: &Path) -> MedMnistOptions {
        MedMnistOptions { flag: None, split: Split::Test, size: Some(18), max_options: None, seed: 3, image_dir: dir.join("images"), image_prefix: "images".into() }
    }

    #[test]
    fn pathmnist_becomes_balanced_shuffled_mcq_with_pngs() {
        let dir = tempfile::tempdir().expect("tmp");
        let path = path_npz(dir.path());
        let (records, report) = load_medmnist(&path, &opts(dir.path())).expect("convert");
        assert_eq!((report.flag, report.pixels, report.items, report.written), (Flag::Path, (8, 8), 30, 18));
        assert!(report.classes.iter().all(|c| c.taken == 2), "{report}");
        let mut per_answer: BTreeMap<&str, usize> = BTreeMap::new();
        for r in &records {
            assert!(r.validate().is_ok());
            assert_eq!(r.options.len(), 9);
            *per_answer.entry(r.answer.as_str()).or_default() += 1;
            let index: usize = r.id.rsplit('/').next().and_then(|s| s.parse().ok()).expect("index in id");
            let truth = if index < 12 { 0 } else { index % 9 };
            assert_eq!(r.answer, Flag::Path.labels()[truth]);
            assert_eq!(r.images, vec![format!("images/pathmnist_64/test/{index}.png")]);
            let png = image::open(dir.path().join(&r.images[0])).expect("png").to_rgb8();
            assert_eq!(png.dimensions(), (8, 8));
            assert_eq!(png.get_pixel(5, 2).0, [pixel(index, 2, 5, 0), pixel(index, 2, 5, 1), pixel(index, 2, 5, 2)]);
        }
        assert!(per_answer.values().all(|&n| n == 2));
        let orders: std::collections::HashSet<_> = records.iter().map(|r| r.options.clone()).collect();
        assert!(orders.len() > 1, "options are shuffled per item");
        assert_eq!(records[0].dataset, "pathmnist");
        assert_eq!(records[0].modality, "histology");

        let (again, _) = load_medmnist(&path, &opts(dir.path())).expect("convert again");
        assert_eq!(again, records, "same seed, same records");
        let capped = MedMnistOptions { max_options: Some(4), seed: 9, ..opts(dir.path()) };
        let (four, _) = load_medmnist(&path, &capped).expect("capped");
        assert!(four.iter().all(|r| r.options.len() == 4 && r.validate().is_ok()));
        assert_ne!(four.iter().map(|r| &r.id).collect::<Vec<_>>(), records.iter().map(|r| &r.id).collect::<Vec<_>>());
    }

    #[test]
    fn chest_is_single_finding_or_none_and_retina_keeps_grade_order() {
        let dir = tempfile::tempdir().expect("tmp");
        // Rows: no finding, effusion only, effusion + mass (skipped), hernia only.
        let mut rows = vec![0u8; 4 * 14];
        rows[14 + 2] = 1;
        rows[2 * 14 + 2] = 1;
        rows[2 * 14 + 4] = 1;
        rows[3 * 14 + 13] = 1;
        let chest = dir.path().join("chestmnist.npz");
        npz(&chest, &[("val_images", npy(&[4, 2, 2], &[7u8; 16])), ("val_labels", npy(&[4, 14], &rows))]);
        let o = MedMnistOptions { split: Split::Val, size: None, max_options: Some(4), ..opts(dir.path()) };
        let (records, report) = load_medmnist(&chest, &o).expect("chest");
        assert_eq!(report.skipped_multi_finding, 1);
        let answers: Vec<&str> = records.iter().map(|r| r.answer.as_str()).collect();
        assert_eq!(answers, vec![NO_FINDING, "effusion", "hernia"]);
        assert!(records.iter().all(|r| r.options.len() == 4 && r.validate().is_ok()));
        let png = image::open(dir.path().join(&records[0].images[0])).expect("png");
        assert_eq!(png.color(), image::ColorType::L8);

        let retina = dir.path().join("retinamnist_128.npz");
        let labels: Vec<i64> = vec![0, 4, 2, 2, 1];
        npz(&retina, &[("test_images", npy(&[5, 2, 2, 3], &[1u8; 60])), ("test_labels", npy(&[5, 1], &labels))]);
        let o = MedMnistOptions { size: Some(3), max_options: Some(3), ..opts(dir.path()) };
        let (records, report) = load_medmnist(&retina, &o).expect("retina");
        assert_eq!(records.len(), 3);
        assert_eq!(report.classes.iter().filter(|c| c.taken > 0).count(), 3);
        for r in &records {
            let grades: Vec<u8> = r.options.iter().map(|o| o.as_bytes()[6]).collect();
            assert!(grades.windows(2).all(|p| p[0] < p[1]), "ordinal options stay in grade order: {:?}", r.options);
            assert!(r.validate().is_ok());
        }
        assert_eq!(records[0].modality, "fundus photography");
    }

    #[test]
    fn bad_files_are_errors_naming_key_and_index() {
        let dir = tempfile::tempdir().expect("tmp");
        let o = opts(dir.path());
        let p = dir.path().join("bloodmnist.npz");
        npz(&p, &[("test_images", npy(&[2, 2, 2], &[0u8; 8])), ("test_labels", npy(&[2, 1], &[1u8, 8]))]);
        let msg = load_medmnist(&p, &o).expect_err("class 8").to_string();
        assert!(msg.contains("bloodmnist.npz:1") && msg.contains("test_labels") && msg.contains("class 8"), "{msg}");

        npz(&p, &[("test_labels", npy(&[2, 1], &[1u8, 2]))]);
        let msg = load_medmnist(&p, &o).expect_err("no images").to_string();
        assert!(msg.contains("no array `test_images`") && msg.contains("test_labels"), "{msg}");

        npz(&p, &[("test_images", npy(&[3, 2, 2], &[0u8; 12])), ("test_labels", npy(&[2, 1], &[1u8, 2]))]);
        assert!(load_medmnist(&p, &o).expect_err("count").to_string().contains("3 images"));

        npz(&p, &[("test_images", npy(&[2, 2, 2], &[0.5f32; 8])), ("test_labels", npy(&[2, 1], &[1u8, 2]))]);
        assert!(load_medmnist(&p, &o).expect_err("float").to_string().contains("expected uint8"));

        npz(&p, &[("test_images", npy(&[2, 2, 2], &[0u8; 8])), ("test_labels", npy(&[2], &[0.5f64, 1.0]))]);
        assert!(load_medmnist(&p, &o).expect_err("float labels").to_string().contains("integer"));

        let p = dir.path().join("mystery.npz");
        std::fs::write(&p, b"not a zip").expect("write");
        assert!(load_medmnist(&p, &o).expect_err("name").to_string().contains("flag"));
        let named = MedMnistOptions { flag: Some(Flag::Blood), ..opts(dir.path()) };
        assert!(load_medmnist(&p, &named).expect_err("zip").to_string().contains("npz"));
    }

    #[test]
    fn flags_and_file_names() {
        assert_eq!(Flag::from_file_name("pathmnist.npz"), Some((Flag::Path, 28)));
        assert_eq!(Flag::from_file_name("organsmnist_224.npz"), Some((Flag::OrganS, 224)));
        assert_eq!(Flag::from_file_name("pathmnist_32.npz"), None);
        assert_eq!(Flag::from_file_name("organmnist3d.npz"), None);
        for f in Flag::ALL {
            assert_eq!(f.name().parse::<Flag>(), Ok(f));
            assert!(f.option_names().len() >= 2);
        }
        assert_eq!(Flag::Breast.labels(), ["malignant", "normal, benign"]);
        assert_eq!(Flag::Chest.option_names().len(), 15);
    }
}

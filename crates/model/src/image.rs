//! The Qwen2-VL image processor: RGB conversion, smart resize with PIL-exact resampling,
//! rescale + normalise, and patchify into `pixel_values` rows with their `grid_thw`.

use std::io::Cursor;
use std::path::{Path, PathBuf};

use ::image::{DynamicImage, ImageReader, Limits, RgbImage};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::error::{Error, Result};

/// OPENAI CLIP channel means, the Qwen2-VL default.
pub const OPENAI_CLIP_MEAN: [f64; 3] = [0.48145466, 0.4578275, 0.40821073];
/// OPENAI CLIP channel standard deviations, the Qwen2-VL default.
pub const OPENAI_CLIP_STD: [f64; 3] = [0.26862954, 0.26130258, 0.27577711];
/// Largest source image (in pixels) we agree to decode; PIL refuses the same amount
/// (`2 * Image.MAX_IMAGE_PIXELS`) as a decompression bomb.
pub const MAX_DECODE_PIXELS: u64 = 178_956_970;
/// Aspect ratios above this are refused by `smart_resize`, as in transformers.
pub const MAX_ASPECT_RATIO: usize = 200;

/// Resampling filter, numbered as PIL's `Image.Resampling` (and HF's `resample` key).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "u8", into = "u8")]
pub enum Resample {
    /// PIL `LANCZOS` (1): windowed sinc, support 3.
    Lanczos,
    /// PIL `BILINEAR` (2): triangle filter, support 1.
    Bilinear,
    /// PIL `BICUBIC` (3): cubic convolution with a = -0.5, support 2; the Qwen2-VL default.
    Bicubic,
    /// PIL `BOX` (4): box filter, support 0.5.
    Box,
    /// PIL `HAMMING` (5): Hamming-windowed sinc, support 1.
    Hamming,
}

impl TryFrom<u8> for Resample {
    type Error = String;
    fn try_from(v: u8) -> std::result::Result<Self, String> {
        match v {
            1 => Ok(Resample::Lanczos),
            2 => Ok(Resample::Bilinear),
            3 => Ok(Resample::Bicubic),
            4 => Ok(Resample::Box),
            5 => Ok(Resample::Hamming),
            _ => Err(format!(
                "unsupported PIL resample filter {v} (supported: 1 lanczos, 2 bilinear, 3 bicubic, 4 box, 5 hamming)"
            )),
        }
    }
}

impl From<Resample> for u8 {
    fn from(r: Resample) -> u8 {
        match r {
            Resample::Lanczos => 1,
            Resample::Bilinear => 2,
            Resample::Bicubic => 3,
            Resample::Box => 4,
            Resample::Hamming => 5,
        }
    }
}

impl Resample {
    fn support(self) -> f64 {
        match self {
            Resample::Box => 0.5,
            Resample::Bilinear | Resample::Hamming => 1.0,
            Resample::Bicubic => 2.0,
            Resample::Lanczos => 3.0,
        }
    }

    // Kernels as in Pillow's Resample.c, so the fixed-point weights come out identical.
    fn weight(self, x: f64) -> f64 {
        fn sinc(x: f64) -> f64 {
            if x == 0.0 {
                1.0
            } else {
                let x = x * std::f64::consts::PI;
                x.sin() / x
            }
        }
        match self {
            Resample::Box => {
                if x > -0.5 && x <= 0.5 {
                    1.0
                } else {
                    0.0
                }
            }
            Resample::Bilinear => {
                let x = x.abs();
                if x < 1.0 { 1.0 - x } else { 0.0 }
            }
            Resample::Hamming => {
                let x = x.abs();
                if x == 0.0 {
                    1.0
                } else if x >= 1.0 {
                    0.0
                } else {
                    let x = x * std::f64::consts::PI;
                    // Pillow writes these constants as C floats.
                    x.sin() / x * (0.54f32 as f64 + 0.46f32 as f64 * x.cos())
                }
            }
            Resample::Bicubic => {
                const A: f64 = -0.5;
                let x = x.abs();
                if x < 1.0 {
                    ((A + 2.0) * x - (A + 3.0)) * x * x + 1.0
                } else if x < 2.0 {
                    (((x - 5.0) * x + 8.0) * x - 4.0) * A
                } else {
                    0.0
                }
            }
            Resample::Lanczos => {
                if (-3.0..3.0).contains(&x) {
                    sinc(x) * sinc(x / 3.0)
                } else {
                    0.0
                }
            }
        }
    }
}

/// Settings of `Qwen2VLImageProcessor`, as found in a model's `preprocessor_config.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct ImageProcessorConfig {
    /// Lower bound on the resized area (`size.shortest_edge` in HF's naming).
    pub min_pixels: usize,
    /// Upper bound on the resized area (`size.longest_edge` in HF's naming).
    pub max_pixels: usize,
    /// Side of one ViT patch in pixels.
    pub patch_size: usize,
    /// Frames per temporal patch; a still image is repeated this many times.
    pub temporal_patch_size: usize,
    /// Side of the square of patches merged into one LLM token.
    pub merge_size: usize,
    /// Per-channel mean subtracted after rescaling.
    pub image_mean: [f64; 3],
    /// Per-channel standard deviation divided by after subtracting the mean.
    pub image_std: [f64; 3],
    /// Factor turning 0..255 values into 0..1.
    pub rescale_factor: f64,
    /// Whether to smart-resize at all.
    pub do_resize: bool,
    /// Whether to multiply by `rescale_factor`.
    pub do_rescale: bool,
    /// Whether to apply `(x - mean) / std`.
    pub do_normalize: bool,
    /// Resampling filter used when the size changes.
    pub resample: Resample,
}

impl Default for ImageProcessorConfig {
    fn default() -> Self {
        ImageProcessorConfig {
            min_pixels: 3136,
            max_pixels: 12_845_056,
            patch_size: 14,
            temporal_patch_size: 2,
            merge_size: 2,
            image_mean: OPENAI_CLIP_MEAN,
            image_std: OPENAI_CLIP_STD,
            rescale_factor: 1.0 / 255.0,
            do_resize: true,
            do_rescale: true,
            do_normalize: true,
            resample: Resample::Bicubic,
        }
    }
}

impl ImageProcessorConfig {
    /// Reads the config from a model directory: `preprocessor_config.json`, else the
    /// `image_processor` object of `processor_config.json`, else the defaults.
    pub fn load(model_dir: &Path) -> Result<Self> {
        let pre = model_dir.join("preprocessor_config.json");
        if pre.is_file() {
            let v = read_json(&pre)?;
            return Self::from_json(&v, &pre);
        }
        let proc = model_dir.join("processor_config.json");
        if proc.is_file() {
            let v = read_json(&proc)?;
            if let Some(ip) = v.get("image_processor") {
                if !ip.is_object() {
                    return Err(Error::config(&proc, "image_processor", "a JSON object"));
                }
                return Self::from_json(ip, &proc);
            }
        }
        Ok(Self::default())
    }

    /// Builds the config from an HF image-processor JSON object; `path` only names the source in errors.
    ///
    /// Unknown keys are ignored because HF files carry many unrelated ones; known keys with the
    /// wrong type are errors. Explicit `min_pixels`/`max_pixels` win over `size`, as in transformers.
    pub fn from_json(v: &Value, path: &Path) -> Result<Self> {
        let obj = v
            .as_object()
            .ok_or_else(|| Error::config(path, "<root>", "a JSON object"))?;
        let mut c = Self::default();

        if let Some(size) = present(obj.get("size")) {
            let size_obj = size.as_object().ok_or_else(|| {
                Error::config(
                    path,
                    "size",
                    "an object with shortest_edge/longest_edge (or min_pixels/max_pixels)",
                )
            })?;
            // Transformers 4.45 wrote `size: {min_pixels, max_pixels}`; later versions use the edge names.
            for (key, is_min) in [
                ("shortest_edge", true),
                ("min_pixels", true),
                ("longest_edge", false),
                ("max_pixels", false),
            ] {
                if let Some(x) = present(size_obj.get(key)) {
                    let n = get_usize(x, path, &format!("size.{key}"))?;
                    if is_min {
                        c.min_pixels = n;
                    } else {
                        c.max_pixels = n;
                    }
                }
            }
        }
        let usize_fields: [(&str, &mut usize); 5] = [
            ("min_pixels", &mut c.min_pixels),
            ("max_pixels", &mut c.max_pixels),
            ("patch_size", &mut c.patch_size),
            ("temporal_patch_size", &mut c.temporal_patch_size),
            ("merge_size", &mut c.merge_size),
        ];
        for (key, dest) in usize_fields {
            if let Some(x) = present(obj.get(key)) {
                *dest = get_usize(x, path, key)?;
            }
        }
        for (key, dest) in [("image_mean", &mut c.image_mean), ("image_std", &mut c.image_std)] {
            if let Some(x) = present(obj.get(key)) {
                *dest = get_triple(x, path, key)?;
            }
        }
        if let Some(x) = present(obj.get("rescale_factor")) {
            c.rescale_factor = x
                .as_f64()
                .filter(|f| f.is_finite())
                .ok_or_else(|| Error::config(path, "rescale_factor", "a finite number"))?;
        }
        for (key, dest) in [
            ("do_resize", &mut c.do_resize),
            ("do_rescale", &mut c.do_rescale),
            ("do_normalize", &mut c.do_normalize),
        ] {
            if let Some(x) = present(obj.get(key)) {
                *dest = x.as_bool().ok_or_else(|| Error::config(path, key, "true or false"))?;
            }
        }
        if let Some(x) = present(obj.get("resample")) {
            let n = x
                .as_u64()
                .and_then(|n| u8::try_from(n).ok())
                .ok_or_else(|| Error::config(path, "resample", "a PIL resampling filter number"))?;
            c.resample = Resample::try_from(n).map_err(|e| Error::config(path, "resample", e))?;
        }
        c.validate(path)?;
        Ok(c)
    }

    /// Checks the values that would otherwise make preprocessing divide by zero or loop on nothing.
    pub fn validate(&self, path: &Path) -> Result<()> {
        for (key, v) in [
            ("patch_size", self.patch_size),
            ("temporal_patch_size", self.temporal_patch_size),
            ("merge_size", self.merge_size),
        ] {
            if v == 0 {
                return Err(Error::config(path, key, "a positive integer"));
            }
        }
        if self.patch_size.checked_mul(self.merge_size).is_none_or(|f| f > 1 << 16) {
            return Err(Error::config(
                path,
                "patch_size",
                "patch_size * merge_size at most 65536",
            ));
        }
        if self.temporal_patch_size > 64 {
            return Err(Error::config(path, "temporal_patch_size", "at most 64"));
        }
        if self.image_std.iter().any(|s| *s == 0.0 || !s.is_finite()) {
            return Err(Error::config(path, "image_std", "three finite non-zero numbers"));
        }
        if self.image_mean.iter().any(|m| !m.is_finite()) {
            return Err(Error::config(path, "image_mean", "three finite numbers"));
        }
        Ok(())
    }

    /// The resize granularity, `patch_size * merge_size` (28 for Qwen2.5-VL).
    pub fn factor(&self) -> usize {
        self.patch_size * self.merge_size
    }
}

fn read_json(path: &Path) -> Result<Value> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    serde_json::from_str(&text).map_err(|e| Error::Json {
        path: path.to_path_buf(),
        cause: e,
    })
}

// HF writes `null` for "not set"; treat it like an absent key.
fn present(v: Option<&Value>) -> Option<&Value> {
    v.filter(|x| !x.is_null())
}

fn get_usize(v: &Value, path: &Path, field: &str) -> Result<usize> {
    // HF sometimes writes integral values as floats (e.g. 3136.0).
    let n = match v {
        Value::Number(n) => n.as_u64().or_else(|| {
            n.as_f64()
                .filter(|f| f.fract() == 0.0 && *f >= 0.0 && *f <= u64::MAX as f64)
                .map(|f| f as u64)
        }),
        _ => None,
    };
    n.and_then(|n| usize::try_from(n).ok())
        .ok_or_else(|| Error::config(path, field, "a non-negative integer"))
}

fn get_triple(v: &Value, path: &Path, field: &str) -> Result<[f64; 3]> {
    let bad = || Error::config(path, field, "a number or a list of 3 numbers");
    match v {
        Value::Number(n) => {
            let x = n.as_f64().ok_or_else(bad)?;
            Ok([x; 3])
        }
        Value::Array(a) if a.len() == 3 => {
            let mut out = [0.0; 3];
            for (o, x) in out.iter_mut().zip(a) {
                *o = x.as_f64().ok_or_else(bad)?;
            }
            Ok(out)
        }
        _ => Err(bad()),
    }
}

/// Target `(height, width)` of the Qwen2-VL resize: both multiples of `factor`, area within
/// `[min_pixels, max_pixels]` where possible, aspect ratio kept as closely as possible.
///
/// Rounding is half-to-even, like Python's `round`. Heights and widths are clamped to at least
/// `factor` (as qwen-vl-utils does) so the result is never empty.
pub fn smart_resize(
    height: usize,
    width: usize,
    factor: usize,
    min_pixels: usize,
    max_pixels: usize,
) -> Result<(usize, usize)> {
    let bad = |problem: String| Error::Input(format!("smart_resize({height}, {width}): {problem}"));
    if height == 0 || width == 0 {
        return Err(bad("zero-sized image".into()));
    }
    if factor == 0 {
        return Err(bad("factor must be positive".into()));
    }
    let (lo, hi) = (height.min(width), height.max(width));
    // Integer form of `hi / lo > 200`, exact where the float division could round.
    if hi as u128 > MAX_ASPECT_RATIO as u128 * lo as u128 {
        return Err(bad(format!(
            "aspect ratio {:.1} exceeds {MAX_ASPECT_RATIO}",
            hi as f64 / lo as f64
        )));
    }
    let (h, w, f) = (height as f64, width as f64, factor as f64);
    let mut h_bar = factor.max(((h / f).round_ties_even() * f) as usize);
    let mut w_bar = factor.max(((w / f).round_ties_even() * f) as usize);
    let area = h_bar as u128 * w_bar as u128;
    if area > max_pixels as u128 {
        let beta = ((h * w) / max_pixels as f64).sqrt();
        h_bar = factor.max(((h / beta / f).floor() * f) as usize);
        w_bar = factor.max(((w / beta / f).floor() * f) as usize);
    } else if area < min_pixels as u128 {
        let beta = (min_pixels as f64 / (h * w)).sqrt();
        h_bar = ((h * beta / f).ceil() * f) as usize;
        w_bar = ((w * beta / f).ceil() * f) as usize;
    }
    // Only reachable with absurd min_pixels (the float casts saturate); refuse rather than allocate.
    if h_bar == 0 || w_bar == 0 || h_bar as u128 * w_bar as u128 > MAX_DECODE_PIXELS as u128 * 4 {
        return Err(bad(format!("resized size {h_bar}x{w_bar} is unusable")));
    }
    Ok((h_bar, w_bar))
}

/// One preprocessed image, ready for the vision tower.
#[derive(Debug, Clone, PartialEq)]
pub struct ProcessedImage {
    /// Row-major `[num_patches, C * T * patch * patch]` values (1176 per row for Qwen2.5-VL).
    pub pixel_values: Vec<f32>,
    /// `[t, h, w]` in patches: `[1, H / patch, W / patch]` for a still image.
    pub grid_thw: [usize; 3],
}

impl ProcessedImage {
    /// Number of patch rows in `pixel_values`, `t * h * w`.
    pub fn num_patches(&self) -> usize {
        self.grid_thw.iter().product()
    }

    /// Number of LLM tokens (`<|image_pad|>` copies) after the `merge_size x merge_size` merge.
    pub fn merged_tokens(&self, merge_size: usize) -> usize {
        self.num_patches() / merge_size.saturating_mul(merge_size).max(1)
    }

    /// Values per patch row.
    pub fn row_len(&self) -> usize {
        self.pixel_values.len().checked_div(self.num_patches()).unwrap_or(0)
    }
}

/// The Qwen2-VL image processor (`Qwen2VLImageProcessor`, PIL flavour).
#[derive(Debug, Clone, PartialEq, Default)]
pub struct ImageProcessor {
    /// The settings in force.
    pub config: ImageProcessorConfig,
}

impl ImageProcessor {
    /// A processor with the given settings.
    pub fn new(config: ImageProcessorConfig) -> Self {
        ImageProcessor { config }
    }

    /// Loads the settings from a model directory (see [`ImageProcessorConfig::load`]).
    pub fn load(model_dir: &Path) -> Result<Self> {
        Ok(Self::new(ImageProcessorConfig::load(model_dir)?))
    }

    /// Decodes and processes the image file at `path`.
    pub fn process_path(&self, path: &Path) -> Result<ProcessedImage> {
        let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
        self.process_bytes(&bytes, &path.display().to_string())
    }

    /// Decodes and processes an encoded image (PNG, JPEG, GIF, BMP, TIFF, WebP); `source_name` names it in errors.
    pub fn process_bytes(&self, bytes: &[u8], source_name: &str) -> Result<ProcessedImage> {
        let img = decode_image(bytes, source_name)?;
        self.process_image(&img, source_name)
    }

    /// Processes a decoded image; `source_name` names it in errors.
    pub fn process_image(&self, img: &DynamicImage, source_name: &str) -> Result<ProcessedImage> {
        let c = &self.config;
        c.validate(&PathBuf::from("<image processor config>"))?;
        let (w, h) = (img.width() as usize, img.height() as usize);
        if w == 0 || h == 0 {
            return Err(image_err(source_name, format!("zero-sized image ({w}x{h})")));
        }
        let rgb = convert_to_rgb(img);
        let factor = c.factor();
        let (th, tw) = if c.do_resize {
            smart_resize(h, w, factor, c.min_pixels, c.max_pixels).map_err(|e| image_err(source_name, e.to_string()))?
        } else {
            if h % factor != 0 || w % factor != 0 {
                return Err(image_err(
                    source_name,
                    format!("do_resize is off but {h}x{w} is not a multiple of {factor} on both sides"),
                ));
            }
            (h, w)
        };
        let rgb = if (th, tw) == (h, w) {
            rgb
        } else {
            resize_rgb(&rgb, tw, th, c.resample)
        };
        let chw = normalize(&rgb, c);
        Ok(patchify(&chw, th, tw, c))
    }
}

fn image_err(source_name: &str, problem: impl Into<String>) -> Error {
    Error::Image {
        source_name: source_name.to_string(),
        problem: problem.into(),
    }
}

/// Decodes an encoded image, refusing zero-sized ones and anything above [`MAX_DECODE_PIXELS`]
/// before the pixel buffer is allocated.
pub fn decode_image(bytes: &[u8], source_name: &str) -> Result<DynamicImage> {
    if bytes.is_empty() {
        return Err(image_err(source_name, "empty file"));
    }
    let reader = |bytes: &[u8]| -> Result<ImageReader<Cursor<Vec<u8>>>> {
        let r = ImageReader::new(Cursor::new(bytes.to_vec()))
            .with_guessed_format()
            .map_err(|e| image_err(source_name, format!("cannot read: {e}")))?;
        if r.format().is_none() {
            return Err(image_err(
                source_name,
                "not a recognised image format (PNG, JPEG, GIF, BMP, TIFF, WebP)",
            ));
        }
        Ok(r)
    };
    // The header alone gives the size, so a bomb is refused before any pixel buffer exists.
    let mut probe = reader(bytes)?;
    probe.limits(header_limits());
    let (w, h) = probe
        .into_dimensions()
        .map_err(|e| image_err(source_name, format!("cannot decode: {}", e.to_string().trim_end())))?;
    if w == 0 || h == 0 {
        return Err(image_err(source_name, format!("zero-sized image ({w}x{h})")));
    }
    let pixels = w as u64 * h as u64;
    if pixels > MAX_DECODE_PIXELS {
        return Err(image_err(
            source_name,
            format!("{w}x{h} = {pixels} pixels exceeds the decode limit of {MAX_DECODE_PIXELS}"),
        ));
    }
    let mut r = reader(bytes)?;
    let mut limits = Limits::default();
    limits.max_image_width = Some(w);
    limits.max_image_height = Some(h);
    // 16-bit RGBA is the widest layout we decode; allow it plus decoder scratch space.
    limits.max_alloc = Some(pixels * 8 + (64 << 20));
    r.limits(limits);
    r.decode()
        .map_err(|e| image_err(source_name, format!("cannot decode: {}", e.to_string().trim_end())))
}

fn header_limits() -> Limits {
    let mut l = Limits::default();
    l.max_alloc = Some(64 << 20);
    l
}

/// Converts any image to 8-bit RGB as transformers' `convert_to_rgb` does: images with an alpha
/// channel are alpha-composited over opaque white with PIL's integer arithmetic; grayscale is
/// replicated; 16-bit and float images are scaled to 8 bits.
pub fn convert_to_rgb(img: &DynamicImage) -> RgbImage {
    if !img.color().has_alpha() {
        return img.to_rgb8();
    }
    let rgba = img.to_rgba8();
    let (w, h) = rgba.dimensions();
    let mut out = RgbImage::new(w, h);
    for (o, p) in out.pixels_mut().zip(rgba.pixels()) {
        let [r, g, b, a] = p.0;
        o.0 = [
            composite_on_white(r, a),
            composite_on_white(g, a),
            composite_on_white(b, a),
        ];
    }
    out
}

// Pillow's ImagingAlphaComposite with an opaque white destination, reduced to one channel;
// the 7 extra precision bits and the shift-based /255 are what make it bit-exact.
fn composite_on_white(src: u8, alpha: u8) -> u8 {
    const PRECISION_BITS: u32 = 7;
    if alpha == 0 {
        return 255;
    }
    let (s, a) = (src as u32, alpha as u32);
    let blend = 255 * (255 - a);
    let outa255 = a * 255 + blend;
    let coef1 = a * 255 * 255 * (1 << PRECISION_BITS) / outa255;
    let coef2 = 255 * (1 << PRECISION_BITS) - coef1;
    let tmp = s * coef1 + 255 * coef2 + (0x80 << PRECISION_BITS);
    let div255 = ((tmp >> 8) + tmp) >> 8;
    (div255 >> PRECISION_BITS).min(255) as u8
}

/// Resizes an RGB image to `out_w x out_h` exactly as Pillow 13's `Image.resize` does for 8-bit
/// RGB: antialiased separable convolution (support scaled by the downscale factor), one pass per
/// axis that changes, each rounded and clamped to `u8` with 22-bit fixed-point weights.
///
/// Pass order follows Pillow 13: vertical first when the height shrinks and the width does not,
/// otherwise horizontal first. Pillow 12 and older always went horizontal first, which differs by
/// a rounding step in some pixels for that one case.
pub fn resize_rgb(img: &RgbImage, out_w: usize, out_h: usize, filter: Resample) -> RgbImage {
    let (in_w, in_h) = (img.width() as usize, img.height() as usize);
    if in_w == 0 || in_h == 0 || out_w == 0 || out_h == 0 {
        return RgbImage::new(out_w as u32, out_h as u32);
    }
    let mut buf: Vec<u8> = img.as_raw().clone();
    let vertical_first = out_w >= in_w && out_h < in_h;
    if vertical_first {
        if out_h != in_h {
            buf = vertical_pass(&buf, in_w, in_h, out_h, filter);
        }
        if out_w != in_w {
            buf = horizontal_pass(&buf, in_w, out_h, out_w, filter);
        }
    } else {
        if out_w != in_w {
            buf = horizontal_pass(&buf, in_w, in_h, out_w, filter);
        }
        if out_h != in_h {
            buf = vertical_pass(&buf, out_w, in_h, out_h, filter);
        }
    }
    // Both passes size their output from (out_w, out_h), so the buffer always matches.
    RgbImage::from_raw(out_w as u32, out_h as u32, buf).unwrap_or_else(|| RgbImage::new(out_w as u32, out_h as u32))
}

fn horizontal_pass(src: &[u8], in_w: usize, h: usize, out_w: usize, filter: Resample) -> Vec<u8> {
    let (bounds, kk, ksize) = precompute_coeffs(in_w, out_w, filter);
    let mut out = vec![0u8; out_w * h * 3];
    for (src_row, dst_row) in src.chunks_exact(in_w * 3).zip(out.chunks_exact_mut(out_w * 3)) {
        for (xx, px) in dst_row.chunks_exact_mut(3).enumerate() {
            let (xmin, n) = bounds[xx];
            let k = &kk[xx * ksize..xx * ksize + n];
            let mut ss = [1i64 << (RESAMPLE_BITS - 1); 3];
            for (i, &kv) in k.iter().enumerate() {
                let s = &src_row[(xmin + i) * 3..(xmin + i) * 3 + 3];
                for c in 0..3 {
                    ss[c] += s[c] as i64 * kv as i64;
                }
            }
            for c in 0..3 {
                px[c] = clip8(ss[c]);
            }
        }
    }
    out
}

fn vertical_pass(src: &[u8], w: usize, in_h: usize, out_h: usize, filter: Resample) -> Vec<u8> {
    let (bounds, kk, ksize) = precompute_coeffs(in_h, out_h, filter);
    let row = w * 3;
    let mut out = vec![0u8; row * out_h];
    for (yy, dst) in out.chunks_exact_mut(row).enumerate() {
        let (ymin, n) = bounds[yy];
        let k = &kk[yy * ksize..yy * ksize + n];
        for (i, o) in dst.iter_mut().enumerate() {
            let mut ss = 1i64 << (RESAMPLE_BITS - 1);
            for (j, &kv) in k.iter().enumerate() {
                ss += src[(ymin + j) * row + i] as i64 * kv as i64;
            }
            *o = clip8(ss);
        }
    }
    out
}

// Pillow's PRECISION_BITS for 8-bit resampling: 32 - 8 - 2.
const RESAMPLE_BITS: u32 = 22;

fn clip8(v: i64) -> u8 {
    if v >= 1i64 << (RESAMPLE_BITS + 8) {
        255
    } else if v <= 0 {
        0
    } else {
        (v >> RESAMPLE_BITS) as u8
    }
}

// Per output index: (first source index, tap count), and the fixed-point weights, `ksize` per row.
// Mirrors Pillow's precompute_coeffs + normalize_coeffs_8bpc, including its truncating casts.
fn precompute_coeffs(in_size: usize, out_size: usize, filter: Resample) -> (Vec<(usize, usize)>, Vec<i32>, usize) {
    let scale = in_size as f64 / out_size as f64;
    let filterscale = scale.max(1.0);
    let support = filter.support() * filterscale;
    let ksize = support.ceil() as usize * 2 + 1;
    let mut bounds = Vec::with_capacity(out_size);
    let mut kk = vec![0i32; out_size * ksize];
    let mut w = vec![0f64; ksize];
    for xx in 0..out_size {
        let center = (xx as f64 + 0.5) * scale;
        let ss = 1.0 / filterscale;
        // C's (int) cast truncates toward zero; the clamp makes negative starts 0 either way.
        let xmin = ((center - support + 0.5) as i64).max(0) as usize;
        let xmax = ((center + support + 0.5) as i64).min(in_size as i64).max(xmin as i64) as usize;
        let n = (xmax - xmin).min(ksize);
        let mut total = 0.0;
        for (x, wx) in w.iter_mut().enumerate().take(n) {
            *wx = filter.weight((x as f64 + xmin as f64 - center + 0.5) * ss);
            total += *wx;
        }
        for x in 0..n {
            let v = if total != 0.0 { w[x] / total } else { w[x] };
            let scaled = v * (1u64 << RESAMPLE_BITS) as f64;
            kk[xx * ksize + x] = if v < 0.0 {
                (-0.5 + scaled) as i32
            } else {
                (0.5 + scaled) as i32
            };
        }
        bounds.push((xmin, n));
    }
    (bounds, kk, ksize)
}

// Channel-first f32 planes with the arithmetic of transformers' default (torchvision) backend,
// which folds the rescale into the normalisation: y = (x - f32(mean * 255)) / f32(std * 255),
// all in f32. This is bit-identical to that backend; the PIL backend's separate rescale differs
// by at most an ulp or so.
fn normalize(rgb: &RgbImage, c: &ImageProcessorConfig) -> Vec<f32> {
    let (w, h) = (rgb.width() as usize, rgb.height() as usize);
    let plane = w * h;
    let mut out = vec![0f32; 3 * plane];
    let (mut mean, mut std) = (c.image_mean.map(|m| m as f32), c.image_std.map(|s| s as f32));
    let mut scale: Option<f32> = c.do_rescale.then_some(c.rescale_factor as f32);
    if c.do_rescale && c.do_normalize {
        let inv = (1.0 / c.rescale_factor) as f32;
        mean = mean.map(|m| m * inv);
        std = std.map(|s| s * inv);
        scale = None;
    }
    let raw = rgb.as_raw();
    for i in 0..plane {
        for ch in 0..3 {
            let mut v = raw[i * 3 + ch] as f32;
            if let Some(s) = scale {
                v *= s;
            }
            if c.do_normalize {
                v = (v - mean[ch]) / std[ch];
            }
            out[ch * plane + i] = v;
        }
    }
    out
}

// Rows in merge-block-major order (block row, block column, inner row, inner column), each row
// laid out (C, T, ph, pw) with the frame repeated T times, as transformers' patchify.
fn patchify(chw: &[f32], h: usize, w: usize, c: &ImageProcessorConfig) -> ProcessedImage {
    let (p, m, t) = (c.patch_size, c.merge_size, c.temporal_patch_size);
    let (gh, gw) = (h / p, w / p);
    let row_len = 3 * t * p * p;
    let plane = h * w;
    let mut out = Vec::with_capacity(gh * gw * row_len);
    for br in 0..gh / m {
        for bc in 0..gw / m {
            for ir in 0..m {
                for ic in 0..m {
                    let (py, px) = (br * m + ir, bc * m + ic);
                    for ch in 0..3 {
                        for _ in 0..t {
                            for y in 0..p {
                                let start = ch * plane + (py * p + y) * w + px * p;
                                out.extend_from_slice(&chw[start..start + p]);
                            }
                        }
                    }
                }
            }
        }
    }
    ProcessedImage {
        pixel_values: out,
        grid_thw: [1, gh, gw],
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use ::image::{GrayImage, ImageFormat, LumaA, Rgb, Rgba, RgbaImage};

    fn encode(img: &DynamicImage, fmt: ImageFormat) -> Vec<u8> {
        let mut buf = Cursor::new(Vec::new());
        img.write_to(&mut buf, fmt).unwrap();
        buf.into_inner()
    }

    // A minimal PNG writer (stored deflate blocks) so tests can make palette and bogus-header files
    // that the image crate's encoder cannot produce. `raw` is the filtered scanline data.
    fn build_png(w: u32, h: u32, depth: u8, color: u8, chunks: &[([u8; 4], Vec<u8>)], raw: &[u8]) -> Vec<u8> {
        fn crc32(bytes: &[u8]) -> u32 {
            let mut c = 0xffff_ffffu32;
            for &b in bytes {
                c ^= b as u32;
                for _ in 0..8 {
                    c = if c & 1 != 0 { 0xedb8_8320 ^ (c >> 1) } else { c >> 1 };
                }
            }
            !c
        }
        fn chunk(out: &mut Vec<u8>, kind: &[u8; 4], data: &[u8]) {
            out.extend_from_slice(&(data.len() as u32).to_be_bytes());
            let mut body = kind.to_vec();
            body.extend_from_slice(data);
            out.extend_from_slice(&body);
            out.extend_from_slice(&crc32(&body).to_be_bytes());
        }
        let mut out = vec![0x89, b'P', b'N', b'G', 13, 10, 26, 10];
        let mut ihdr = Vec::new();
        ihdr.extend_from_slice(&w.to_be_bytes());
        ihdr.extend_from_slice(&h.to_be_bytes());
        ihdr.extend_from_slice(&[depth, color, 0, 0, 0]);
        chunk(&mut out, b"IHDR", &ihdr);
        for (kind, data) in chunks {
            chunk(&mut out, kind, data);
        }
        let mut z = vec![0x78, 0x01, 0x01];
        z.extend_from_slice(&(raw.len() as u16).to_le_bytes());
        z.extend_from_slice(&(!(raw.len() as u16)).to_le_bytes());
        z.extend_from_slice(raw);
        let (mut s1, mut s2) = (1u32, 0u32);
        for &b in raw {
            s1 = (s1 + b as u32) % 65521;
            s2 = (s2 + s1) % 65521;
        }
        z.extend_from_slice(&((s2 << 16) | s1).to_be_bytes());
        chunk(&mut out, b"IDAT", &z);
        chunk(&mut out, b"IEND", &[]);
        out
    }

    #[test]
    fn smart_resize_reference_cases() {
        // §2.3 worked examples.
        assert_eq!(smart_resize(224, 224, 28, 3136, 802_816).unwrap(), (224, 224));
        assert_eq!(smart_resize(224, 224, 28, 1_003_520, 12_845_056).unwrap(), (1008, 1008));
        assert_eq!(smart_resize(112, 168, 28, 3136, 12_845_056).unwrap(), (112, 168));
        // Max branch: 1000x2000 has 2M pixels > 1003520.
        // beta = sqrt(2e6 / 1003520) = 1.41173..; 1000/beta/28 = 25.29 -> 700; 2000/beta/28 = 50.59 -> 1400.
        assert_eq!(smart_resize(1000, 2000, 28, 3136, 1_003_520).unwrap(), (700, 1400));
        // Min branch: 20x30 rounds to 28x28 = 784 < 3136; beta = sqrt(3136/600) = 2.2862;
        // ceil(20*2.2862/28)=2 -> 56, ceil(30*2.2862/28)=3 -> 84.
        assert_eq!(smart_resize(20, 30, 28, 3136, 12_845_056).unwrap(), (56, 84));
        // Round-half-to-even: 42/28 = 1.5 -> 2; 70/28 = 2.5 -> 2 (f64::round would give 3).
        assert_eq!(smart_resize(42, 70, 28, 0, 1 << 30).unwrap(), (56, 56));
        assert_eq!(smart_resize(98, 126, 28, 0, 1 << 30).unwrap(), (112, 112)); // 3.5 -> 4, 4.5 -> 4
        // Aspect ratio exactly 200 is allowed, above is not.
        assert!(smart_resize(28, 5600, 28, 3136, 12_845_056).is_ok());
        let e = smart_resize(28, 5601, 28, 3136, 12_845_056).unwrap_err();
        assert!(e.to_string().contains("aspect ratio"), "{e}");
        assert!(smart_resize(0, 10, 28, 3136, 12_845_056).is_err());
        assert!(smart_resize(10, 0, 28, 3136, 12_845_056).is_err());
    }

    #[test]
    fn smart_resize_never_returns_zero_side() {
        // 28x5600 with a tiny max_pixels: transformers clamps the floor branch to `factor`.
        let (h, w) = smart_resize(28, 5600, 28, 0, 784).unwrap();
        assert!(h >= 28 && w >= 28);
        assert_eq!(h % 28, 0);
        assert_eq!(w % 28, 0);
    }

    #[test]
    fn patchify_order_element_by_element() {
        // 56x84 image: grid 4x6 patches of 14 -> merged 2x3 blocks.
        let (h, w) = (56usize, 84usize);
        let cfg = ImageProcessorConfig {
            do_rescale: false,
            do_normalize: false,
            ..ImageProcessorConfig::default()
        };
        // Distinct value per (channel, y, x) that survives the f32 round trip: use raw values 0..255
        // via a formula, then check against the index formula directly.
        let mut img = RgbImage::new(w as u32, h as u32);
        for y in 0..h {
            for x in 0..w {
                let v = |c: usize| ((c * 97 + y * 7 + x * 3) % 256) as u8;
                img.put_pixel(x as u32, y as u32, Rgb([v(0), v(1), v(2)]));
            }
        }
        let out = ImageProcessor::new(cfg)
            .process_image(&DynamicImage::ImageRgb8(img), "synthetic")
            .unwrap();
        assert_eq!(out.grid_thw, [1, 4, 6]);
        assert_eq!(out.num_patches(), 24);
        assert_eq!(out.merged_tokens(2), 6);
        assert_eq!(out.pixel_values.len(), 24 * 1176);
        assert_eq!(out.row_len(), 1176);
        let mut checked = 0;
        for row in 0..24 {
            // Block-major: 4 rows per merged token, blocks in raster order over the 2x3 merged grid.
            let block = row / 4;
            let (br, bc) = (block / 3, block % 3);
            let (ir, ic) = ((row % 4) / 2, row % 2);
            let (py, px) = (br * 2 + ir, bc * 2 + ic);
            for c in 0..3 {
                for t in 0..2 {
                    for y in 0..14 {
                        for x in 0..14 {
                            let col = ((c * 2 + t) * 14 + y) * 14 + x;
                            let (iy, ix) = (py * 14 + y, px * 14 + x);
                            let want = ((c * 97 + iy * 7 + ix * 3) % 256) as f32;
                            assert_eq!(out.pixel_values[row * 1176 + col], want, "row {row} col {col}");
                            checked += 1;
                        }
                    }
                }
            }
        }
        assert_eq!(checked, 24 * 1176);
    }

    #[test]
    fn normalisation_matches_clip_formula() {
        let img = RgbImage::from_pixel(28, 28, Rgb([0, 128, 255]));
        let out = ImageProcessor::default()
            .process_image(&DynamicImage::ImageRgb8(img), "flat")
            .unwrap();
        // 28x28 < min_pixels 3136, so it is upscaled to 56x56; a flat image stays flat.
        assert_eq!(out.grid_thw, [1, 4, 4]);
        // The fused torchvision form: (x - f32(mean) * 255) / (f32(std) * 255) in f32.
        let m = OPENAI_CLIP_MEAN.map(|x| x as f32 * 255.0);
        let s = OPENAI_CLIP_STD.map(|x| x as f32 * 255.0);
        let (r, g, b) = ((0.0 - m[0]) / s[0], (128.0 - m[1]) / s[1], (255.0 - m[2]) / s[2]);
        // Within an ulp of the textbook (x / 255 - mean) / std.
        assert!((g - ((128.0f64 / 255.0 - OPENAI_CLIP_MEAN[1]) / OPENAI_CLIP_STD[1]) as f32).abs() < 1e-6);
        let row = &out.pixel_values[..1176];
        assert!(row[..392].iter().all(|v| *v == r));
        assert!(row[392..784].iter().all(|v| *v == g));
        assert!(row[784..].iter().all(|v| *v == b));
    }

    #[test]
    fn rgba_composited_on_white() {
        // Values from Pillow 13: Image.alpha_composite(white, RGBA pixel).convert("RGB").
        let cases: [([u8; 4], [u8; 3]); 6] = [
            ([0, 0, 0, 0], [255, 255, 255]),
            ([10, 20, 30, 255], [10, 20, 30]),
            ([0, 0, 0, 128], [127, 127, 127]),
            ([200, 100, 50, 1], [255, 254, 254]),
            ([255, 0, 128, 200], [255, 55, 155]),
            ([17, 34, 51, 77], [183, 188, 193]),
        ];
        let mut img = RgbaImage::new(cases.len() as u32, 1);
        for (i, (px, _)) in cases.iter().enumerate() {
            img.put_pixel(i as u32, 0, Rgba(*px));
        }
        let rgb = convert_to_rgb(&DynamicImage::ImageRgba8(img));
        for (i, (_, want)) in cases.iter().enumerate() {
            assert_eq!(rgb.get_pixel(i as u32, 0).0, *want, "pixel {i}");
        }
        // LA goes the same way.
        let la = ::image::GrayAlphaImage::from_pixel(1, 1, LumaA([0, 128]));
        assert_eq!(
            convert_to_rgb(&DynamicImage::ImageLumaA8(la)).get_pixel(0, 0).0,
            [127, 127, 127]
        );
    }

    #[test]
    fn grayscale_is_replicated() {
        let g = GrayImage::from_fn(3, 2, |x, y| ::image::Luma([(x * 50 + y * 7) as u8]));
        let rgb = convert_to_rgb(&DynamicImage::ImageLuma8(g.clone()));
        for (p, q) in rgb.pixels().zip(g.pixels()) {
            assert_eq!(p.0, [q.0[0]; 3]);
        }
        // 16-bit grayscale is scaled, not clipped.
        let g16 = ::image::ImageBuffer::<::image::Luma<u16>, _>::from_pixel(1, 1, ::image::Luma([65535u16]));
        assert_eq!(
            convert_to_rgb(&DynamicImage::ImageLuma16(g16)).get_pixel(0, 0).0,
            [255; 3]
        );
        let g16 = ::image::ImageBuffer::<::image::Luma<u16>, _>::from_pixel(1, 1, ::image::Luma([32896u16]));
        assert_eq!(
            convert_to_rgb(&DynamicImage::ImageLuma16(g16)).get_pixel(0, 0).0,
            [128; 3]
        );
    }

    #[test]
    fn palette_png_expands_through_rgba() {
        // 2x1 palette PNG: entry 0 opaque red, entry 1 fully transparent blue.
        let png = build_png(
            2,
            1,
            8,
            3,
            &[(*b"PLTE", vec![255, 0, 0, 0, 0, 255]), (*b"tRNS", vec![255, 0])],
            &[0, 0, 1],
        );
        let img = decode_image(&png, "palette.png").unwrap();
        let rgb = convert_to_rgb(&img);
        assert_eq!(rgb.get_pixel(0, 0).0, [255, 0, 0]);
        assert_eq!(rgb.get_pixel(1, 0).0, [255, 255, 255]);
    }

    #[test]
    fn bicubic_matches_pillow() {
        // src[y][x][c] = (x*37 + y*91 + 40*c) % 256, 7 wide and 5 high.
        let src = RgbImage::from_fn(7, 5, |x, y| {
            let v = |c: u32| ((x * 37 + y * 91 + 40 * c) % 256) as u8;
            Rgb([v(0), v(1), v(2)])
        });
        let plane = |img: &RgbImage, c: usize| -> Vec<Vec<u8>> {
            (0..img.height())
                .map(|y| (0..img.width()).map(|x| img.get_pixel(x, y).0[c]).collect())
                .collect()
        };
        // Expected values from Pillow 13: Image.fromarray(src).resize(size, Image.BICUBIC).
        let down = resize_rgb(&src, 4, 3, Resample::Bicubic);
        assert_eq!(
            plane(&down, 0),
            [[55, 120, 166, 132], [145, 83, 117, 133], [83, 151, 106, 127]]
        );
        assert_eq!(
            plane(&down, 2),
            [[140, 169, 123, 70], [77, 128, 140, 159], [164, 105, 129, 98]]
        );
        let up = resize_rgb(&src, 10, 8, Resample::Bicubic);
        assert_eq!(plane(&up, 0)[0], [0, 10, 39, 65, 91, 117, 144, 184, 218, 236]);
        assert_eq!(plane(&up, 1)[7], [153, 172, 207, 233, 65, 0, 30, 55, 94, 124]);
        // Width grows, height shrinks: Pillow 13 runs the vertical pass first.
        let mixed = resize_rgb(&src, 9, 3, Resample::Bicubic);
        assert_eq!(
            plane(&mixed, 0),
            [
                [38, 62, 93, 122, 151, 187, 144, 117, 150],
                [126, 161, 118, 52, 91, 131, 122, 121, 150],
                [66, 90, 121, 153, 179, 83, 83, 126, 150]
            ]
        );
        // Width-only change: only the horizontal pass runs.
        let wonly = resize_rgb(&src, 3, 5, Resample::Bicubic);
        assert_eq!(
            plane(&wonly, 0),
            [
                [27, 111, 195],
                [119, 198, 76],
                [163, 41, 120],
                [44, 128, 212],
                [144, 145, 38]
            ]
        );
    }

    #[test]
    fn bad_bytes_are_errors_naming_the_source() {
        let p = ImageProcessor::default();
        for (bytes, what) in [
            (&b""[..], "empty file"),
            (&b"definitely not an image"[..], "not a recognised image format"),
            (&[0x89, b'P', b'N', b'G', 13, 10, 26, 10, 0, 0][..], "cannot decode"),
        ] {
            let e = p.process_bytes(bytes, "x.bin").unwrap_err();
            let s = e.to_string();
            assert!(matches!(e, Error::Image { .. }), "{s}");
            assert!(s.contains("x.bin") && s.contains(what), "{s}");
        }
        // A valid PNG cut in half.
        let png = encode(
            &DynamicImage::ImageRgb8(RgbImage::from_pixel(64, 64, Rgb([1, 2, 3]))),
            ImageFormat::Png,
        );
        let e = p.process_bytes(&png[..png.len() / 2], "cut.png").unwrap_err();
        assert!(matches!(e, Error::Image { .. }), "{e}");
        // A corrupt JPEG header.
        let jpg = encode(
            &DynamicImage::ImageRgb8(RgbImage::from_pixel(32, 32, Rgb([9, 9, 9]))),
            ImageFormat::Jpeg,
        );
        let e = p.process_bytes(&jpg[..jpg.len() / 2], "half.jpg").unwrap_err();
        assert!(
            e.to_string().contains("half.jpg") && !e.to_string().ends_with('\n'),
            "{e}"
        );
        let mut bad = jpg[..20].to_vec();
        bad.extend_from_slice(&[0xff; 40]);
        assert!(p.process_bytes(&bad, "bad.jpg").is_err());
    }

    #[test]
    fn zero_sized_and_oversized_are_refused() {
        let p = ImageProcessor::default();
        let e = p
            .process_image(&DynamicImage::ImageRgb8(RgbImage::new(0, 5)), "empty")
            .unwrap_err();
        assert!(e.to_string().contains("zero-sized"), "{e}");
        // A PNG header claiming 100000 x 100000 pixels: refused from the header, nothing allocated.
        let png = build_png(100_000, 100_000, 8, 2, &[], &[]);
        let e = p.process_bytes(&png, "bomb.png").unwrap_err();
        assert!(e.to_string().contains("exceeds the decode limit"), "{e}");
    }

    #[test]
    fn round_trip_through_png_and_path() {
        let img = DynamicImage::ImageRgb8(RgbImage::from_fn(168, 112, |x, y| Rgb([x as u8, y as u8, 7])));
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a.png");
        std::fs::write(&path, encode(&img, ImageFormat::Png)).unwrap();
        let p = ImageProcessor::default();
        let a = p.process_path(&path).unwrap();
        let b = p.process_image(&img, "mem").unwrap();
        assert_eq!(a, b);
        assert_eq!(a.grid_thw, [1, 8, 12]);
        assert_eq!(a.merged_tokens(2), 24);
        let e = p.process_path(&dir.path().join("missing.png")).unwrap_err();
        assert!(matches!(e, Error::Io { .. }));
    }

    #[test]
    fn config_loading_variants() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(
            ImageProcessorConfig::load(dir.path()).unwrap(),
            ImageProcessorConfig::default()
        );

        std::fs::write(
            dir.path().join("processor_config.json"),
            r#"{"image_processor": {"size": {"shortest_edge": 100, "longest_edge": 200000}, "resample": 3,
                "image_processor_type": "Qwen2VLImageProcessor", "foo": [1,2]}, "processor_class": "X"}"#,
        )
        .unwrap();
        let c = ImageProcessorConfig::load(dir.path()).unwrap();
        assert_eq!((c.min_pixels, c.max_pixels), (100, 200_000));

        let pre = dir.path().join("preprocessor_config.json");
        std::fs::write(
            &pre,
            r#"{"min_pixels": 3136, "max_pixels": 401408, "size": {"shortest_edge": 1, "longest_edge": 2},
                "patch_size": 14, "temporal_patch_size": 2, "merge_size": 2, "image_mean": [0.5, 0.5, 0.5],
                "image_std": 0.5, "rescale_factor": 0.00392156862745098, "do_convert_rgb": true,
                "image_processor_type": "Qwen2VLImageProcessor", "crop_size": null}"#,
        )
        .unwrap();
        let c = ImageProcessorConfig::load(dir.path()).unwrap();
        assert_eq!((c.min_pixels, c.max_pixels), (3136, 401_408));
        assert_eq!(c.image_mean, [0.5; 3]);
        assert_eq!(c.image_std, [0.5; 3]);

        std::fs::write(&pre, r#"{"max_pixels": "lots"}"#).unwrap();
        let e = ImageProcessorConfig::load(dir.path()).unwrap_err();
        let s = e.to_string();
        assert!(
            s.contains("preprocessor_config.json") && s.contains("max_pixels"),
            "{s}"
        );

        std::fs::write(&pre, r#"{"image_std": [1, 0, 1]}"#).unwrap();
        assert!(
            ImageProcessorConfig::load(dir.path())
                .unwrap_err()
                .to_string()
                .contains("image_std")
        );
        std::fs::write(&pre, r#"{"resample": 0}"#).unwrap();
        assert!(
            ImageProcessorConfig::load(dir.path())
                .unwrap_err()
                .to_string()
                .contains("resample")
        );
        std::fs::write(&pre, r#"{"patch_size": 0}"#).unwrap();
        assert!(
            ImageProcessorConfig::load(dir.path())
                .unwrap_err()
                .to_string()
                .contains("patch_size")
        );
        std::fs::write(&pre, "{not json").unwrap();
        assert!(matches!(
            ImageProcessorConfig::load(dir.path()).unwrap_err(),
            Error::Json { .. }
        ));
    }
}

//! The probes' image transforms, as torchvision defines them in the paper's `linprobe.py` /
//! `knn.py`: training `RandomResizedCrop(size, bicubic)` + `RandomHorizontalFlip()`, evaluation
//! `Resize(256, bicubic)` + `CenterCrop(size)`. Resizing uses the model crate's PIL-exact
//! bicubic filter. Random draws come from our RNG, so crops match torchvision in distribution,
//! not draw for draw.

use image::RgbImage;
use image::imageops::{crop_imm, flip_horizontal};
use medrl_model::image::{Resample, resize_rgb};
use rand::Rng;

/// torchvision's default crop-area range of `RandomResizedCrop`.
pub const CROP_SCALE: (f64, f64) = (0.08, 1.0);

/// torchvision's default aspect-ratio range of `RandomResizedCrop`.
pub const CROP_RATIO: (f64, f64) = (3.0 / 4.0, 4.0 / 3.0);

/// A crop rectangle in pixels.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Crop {
    /// First row.
    pub top: u32,
    /// First column.
    pub left: u32,
    /// Rows.
    pub height: u32,
    /// Columns.
    pub width: u32,
}

/// `RandomResizedCrop.get_params`: ten tries at a random area and log-uniform aspect ratio that
/// fit the image, else the central crop clamped to the ratio range.
pub fn random_crop_params(height: u32, width: u32, rng: &mut impl Rng) -> Crop {
    let (h, w) = (f64::from(height), f64::from(width));
    let area = h * w;
    let (log_lo, log_hi) = (CROP_RATIO.0.ln(), CROP_RATIO.1.ln());
    for _ in 0..10 {
        let target = area * rng.random_range(CROP_SCALE.0..=CROP_SCALE.1);
        let aspect = rng.random_range(log_lo..=log_hi).exp();
        // Python's round() rounds half to even.
        let cw = (target * aspect).sqrt().round_ties_even();
        let ch = (target / aspect).sqrt().round_ties_even();
        if cw > 0.0 && cw <= w && ch > 0.0 && ch <= h {
            let (cw, ch) = (cw as u32, ch as u32);
            let top = rng.random_range(0..=height - ch);
            let left = rng.random_range(0..=width - cw);
            return Crop { top, left, height: ch, width: cw };
        }
    }
    let ratio = w / h;
    let (cw, ch) = if ratio < CROP_RATIO.0 {
        (w, (w / CROP_RATIO.0).round_ties_even())
    } else if ratio > CROP_RATIO.1 {
        ((h * CROP_RATIO.1).round_ties_even(), h)
    } else {
        (w, h)
    };
    let (cw, ch) = ((cw as u32).clamp(1, width), (ch as u32).clamp(1, height));
    Crop { top: (height - ch) / 2, left: (width - cw) / 2, height: ch, width: cw }
}

/// Training view: a random resized crop to `size` x `size`, then a horizontal flip with
/// probability one half.
pub fn train_view(img: &RgbImage, size: u32, rng: &mut impl Rng) -> RgbImage {
    let c = random_crop_params(img.height(), img.width(), rng);
    let cropped = crop_imm(img, c.left, c.top, c.width, c.height).to_image();
    let resized = resize_rgb(&cropped, size as usize, size as usize, Resample::Bicubic);
    if rng.random_bool(0.5) { flip_horizontal(&resized) } else { resized }
}

/// Evaluation view: the shorter side resized to `resize` (the longer side truncated as
/// torchvision computes it), then the central `crop` x `crop` square.
pub fn eval_view(img: &RgbImage, resize: u32, crop: u32) -> RgbImage {
    let (w, h) = img.dimensions();
    let (short, long) = if w <= h { (w, h) } else { (h, w) };
    let new_long = (u64::from(resize) * u64::from(long) / u64::from(short.max(1))) as u32;
    let (nw, nh) = if w <= h { (resize, new_long) } else { (new_long, resize) };
    let resized = if (nw, nh) == (w, h) { img.clone() } else { resize_rgb(img, nw as usize, nh as usize, Resample::Bicubic) };
    let crop = crop.min(nw).min(nh);
    // torchvision: int(round((H - crop) / 2.0)), with Python's half-to-even rounding.
    let top = (f64::from(nh - crop) / 2.0).round_ties_even() as u32;
    let left = (f64::from(nw - crop) / 2.0).round_ties_even() as u32;
    crop_imm(&resized, left, top, crop, crop).to_image()
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;
    use rand::rngs::StdRng;

    #[test]
    fn random_crops_stay_inside_and_respect_the_ranges() {
        let mut rng = StdRng::seed_from_u64(7);
        for _ in 0..500 {
            let c = random_crop_params(60, 90, &mut rng);
            assert!(c.top + c.height <= 60 && c.left + c.width <= 90 && c.height > 0 && c.width > 0, "{c:?}");
            let area = f64::from(c.height * c.width) / (60.0 * 90.0);
            assert!((0.07..=1.0).contains(&area), "{c:?}");
        }
    }

    #[test]
    fn views_have_the_requested_size() {
        let img = RgbImage::from_fn(40, 30, |x, y| image::Rgb([x as u8, y as u8, 0]));
        let mut rng = StdRng::seed_from_u64(0);
        assert_eq!(train_view(&img, 16, &mut rng).dimensions(), (16, 16));
        assert_eq!(eval_view(&img, 20, 16).dimensions(), (16, 16));
        // 30 -> 20 on the short side, 40 -> int(20 * 40 / 30) = 26 on the long side.
        let v = eval_view(&img, 20, 20);
        assert_eq!(v.dimensions(), (20, 20));
    }

    #[test]
    fn eval_view_of_an_exact_size_image_is_its_centre() {
        let img = RgbImage::from_fn(8, 8, |x, y| image::Rgb([(x * 10) as u8, (y * 10) as u8, 0]));
        let v = eval_view(&img, 8, 4);
        assert_eq!(v.get_pixel(0, 0), &image::Rgb([20, 20, 0]));
    }
}

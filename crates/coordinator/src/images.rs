//! Content-addressed images: a lease names each image by the sha256 of its bytes, and workers
//! fetch them with GetImage, so no shared filesystem is needed. Hashes are computed on first use
//! and cached; a file is re-verified when served, so a changed file is never passed off under an
//! old address. A restarted coordinator has hashed nothing yet, so a request may also name the
//! image: any prompt's image is found by its name and served if its bytes have the address.

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use bytes::Bytes;
use sha2::{Digest, Sha256};

use crate::prompts::PromptSet;

/// An image resolved to its content address.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResolvedImage {
    /// Lowercase hex sha256 of the bytes.
    pub sha256: String,
    /// Size of the file.
    pub size_bytes: u64,
}

/// Reading or serving an image failed.
#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    /// The file could not be read.
    #[error("image {path}: {cause}")]
    Io {
        /// The image file.
        path: PathBuf,
        /// The I/O error.
        cause: std::io::Error,
    },
    /// The file is empty or larger than allowed.
    #[error("image {path}: {size} bytes; expected 1 to {max} bytes")]
    Size {
        /// The image file.
        path: PathBuf,
        /// Its size.
        size: u64,
        /// The limit.
        max: u64,
    },
    /// The file changed since its address was handed out.
    #[error("image {path} changed on disk since it was leased (sha256 {expected} expected)")]
    Changed {
        /// The image file.
        path: PathBuf,
        /// The address it was leased under.
        expected: String,
    },
    /// No leased image has this address, and the request named none of the prompts' images
    /// with it.
    #[error("no image with sha256 {0}")]
    Unknown(String),
}

/// The coordinator's images, resolved lazily.
#[derive(Debug)]
pub struct ImageStore {
    base: PathBuf,
    max_bytes: u64,
    /// The record image paths a request may name: nothing else under `base` is served.
    names: HashSet<String>,
    by_name: Mutex<HashMap<String, ResolvedImage>>,
    by_sha: Mutex<HashMap<String, PathBuf>>,
}

impl ImageStore {
    /// The images of `prompts` (record paths relative to its folder); larger than `max_bytes` is
    /// an error.
    pub fn new(prompts: &PromptSet, max_bytes: u64) -> ImageStore {
        let names = (0..prompts.len()).filter_map(|i| prompts.get(i)).flat_map(|r| r.images.iter().cloned()).collect();
        ImageStore { base: prompts.base_dir().to_path_buf(), max_bytes, names, by_name: Mutex::default(), by_sha: Mutex::default() }
    }

    fn path_of(&self, name: &str) -> PathBuf {
        self.base.join(name)
    }

    fn read_checked(&self, path: &Path) -> Result<Vec<u8>, ImageError> {
        let io = |cause| ImageError::Io { path: path.to_path_buf(), cause };
        let size = std::fs::metadata(path).map_err(io)?.len();
        if size == 0 || size > self.max_bytes {
            return Err(ImageError::Size { path: path.to_path_buf(), size, max: self.max_bytes });
        }
        std::fs::read(path).map_err(io)
    }

    /// The content address of a record's image (blocking: reads and hashes on first use).
    pub fn resolve(&self, name: &str) -> Result<ResolvedImage, ImageError> {
        if let Some(hit) = self.by_name.lock().ok().and_then(|m| m.get(name).cloned()) {
            return Ok(hit);
        }
        self.hash_and_index(name).map(|(resolved, _)| resolved)
    }

    /// Reads and hashes a record's image, indexes it by name and address, and returns its bytes.
    fn hash_and_index(&self, name: &str) -> Result<(ResolvedImage, Vec<u8>), ImageError> {
        let path = self.path_of(name);
        let bytes = self.read_checked(&path)?;
        let resolved = ResolvedImage { sha256: hex::encode(Sha256::digest(&bytes)), size_bytes: bytes.len() as u64 };
        if let Ok(mut m) = self.by_sha.lock() {
            m.insert(resolved.sha256.clone(), path);
        }
        if let Ok(mut m) = self.by_name.lock() {
            m.insert(name.to_string(), resolved.clone());
        }
        Ok((resolved, bytes))
    }

    /// The bytes of an image (blocking), verified against its address: one some lease referenced,
    /// else the prompt image called `name` (empty: none) when its bytes have that address.
    pub fn read(&self, sha256: &str, name: &str) -> Result<Bytes, ImageError> {
        let known = self.by_sha.lock().ok().and_then(|m| m.get(sha256).cloned());
        let path = match known {
            Some(path) => path,
            None if self.names.contains(name) => {
                // Just hashed: these bytes need no second read to be verified.
                let (resolved, bytes) = self.hash_and_index(name)?;
                return if resolved.sha256 == sha256 { Ok(Bytes::from(bytes)) } else { Err(ImageError::Unknown(sha256.to_string())) };
            }
            None => return Err(ImageError::Unknown(sha256.to_string())),
        };
        let bytes = self.read_checked(&path)?;
        if hex::encode(Sha256::digest(&bytes)) != sha256 {
            return Err(ImageError::Changed { path, expected: sha256.to_string() });
        }
        Ok(Bytes::from(bytes))
    }
}

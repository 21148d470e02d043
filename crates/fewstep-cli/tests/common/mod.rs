//! Helpers shared by the CLI tests: the fixtures folder, running the `fewstep` binary, copying a model,
//! comparing pictures.
#![allow(dead_code)]

use std::path::Path;
use std::process::{Command, Output};

use fewstep::image::{read_png, RgbImage};

pub const FIXTURES: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../../tests/fixtures");

/// Runs the `fewstep` binary with `args`.
pub fn fewstep(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_fewstep"))
        .args(args)
        .output()
        .unwrap()
}

/// Asserts the command succeeded (showing its stderr otherwise) and returns its stdout.
pub fn ok(out: Output) -> String {
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Copies the folder `src` to `dst`, following symbolic links.
pub fn copy_dir(src: &Path, dst: &Path) {
    std::fs::create_dir_all(dst).unwrap();
    for e in std::fs::read_dir(src).unwrap() {
        let p = e.unwrap().path();
        let to = dst.join(p.file_name().unwrap());
        if p.is_dir() {
            copy_dir(&p, &to);
        } else {
            std::fs::copy(&p, &to).unwrap();
        }
    }
}

/// The largest difference of any channel of any pixel between two pictures of one size.
pub fn max_image_difference(a: &RgbImage, b: &RgbImage) -> u8 {
    assert_eq!((a.width, a.height), (b.width, b.height));
    a.data
        .iter()
        .zip(&b.data)
        .map(|(x, y)| x.abs_diff(*y))
        .max()
        .unwrap()
}

/// [`max_image_difference`] of two PNG files.
pub fn max_pixel_difference(a: &Path, b: &Path) -> u8 {
    max_image_difference(&read_png(a).unwrap(), &read_png(b).unwrap())
}

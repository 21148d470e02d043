//! `fewstep train-classifier` and `fewstep eval` end to end on the tiny fixture model: the row has the
//! scores in range, the JSON file equals what is printed, the sample grid has the pictures; bad inputs
//! are refused with what was expected.

mod common;

use std::path::{Path, PathBuf};

use common::{fewstep, ok, FIXTURES};
use serde_json::Value;

fn stdout_json(out: std::process::Output) -> Value {
    serde_json::from_str(&ok(out)).unwrap()
}

fn stderr(out: &std::process::Output) -> String {
    assert!(!out.status.success(), "the command succeeded");
    String::from_utf8_lossy(&out.stderr).into_owned()
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

fn eval_args<'a>(classifier: &'a str, model: &'a str, count: &'a str) -> Vec<&'a str> {
    vec![
        "eval",
        "--model",
        model,
        "--scheduler",
        "lcm",
        "--steps",
        "2",
        "--guidance",
        "1",
        "--classifier",
        classifier,
        "--count",
        count,
        "--batch",
        "4",
        "--real",
        "8",
    ]
}

#[test]
fn a_classifier_then_an_eval_row() {
    let dir = tempfile::tempdir().unwrap();
    let classifier = dir.path().join("classifier.safetensors");
    let trained = stdout_json(fewstep(&[
        "train-classifier",
        "--out",
        s(&classifier),
        "--steps",
        "3",
        "--images-per-style",
        "8",
        "--batch-size",
        "4",
        "--side",
        "16",
    ]));
    for head in ["shapes", "colours", "background", "style"] {
        let a = trained["held_out_accuracy"][head].as_f64().unwrap();
        assert!((0.0..=1.0).contains(&a), "{head}: {a}");
    }
    assert!(classifier.is_file());

    let model = PathBuf::from(FIXTURES).join("tiny-sd");
    let (json, samples) = (dir.path().join("row.json"), dir.path().join("s.png"));
    let mut args = eval_args(s(&classifier), s(&model), "6");
    args.extend(["--json", s(&json), "--samples", s(&samples)]);
    let row = stdout_json(fewstep(&args));
    assert_eq!(row["count"], 6);
    assert_eq!(row["scheduler"], "lcm");
    let fid = row["fid"].as_f64().unwrap();
    assert!(fid.is_finite() && fid >= 0.0, "fid {fid}");
    for k in ["adherence", "background", "outline_share"] {
        let v = row[k].as_f64().unwrap();
        assert!((0.0..=1.0).contains(&v), "{k}: {v}");
    }
    assert!(row["seconds_per_image"].as_f64().unwrap() > 0.0);
    let written: Value = serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    assert_eq!(written, row);
    let grid = fewstep::image::read_png(&samples).unwrap();
    let side = grid.height - 2;
    assert_eq!(grid.width, 8 * (side + 2), "one row of 8 cells");
}

#[test]
fn eval_refuses_bad_inputs() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("none.safetensors");
    let model = PathBuf::from(FIXTURES).join("tiny-sd");
    let err = stderr(&fewstep(&eval_args(s(&missing), s(&model), "6")));
    assert!(
        err.contains("none.safetensors") && err.contains("train-classifier"),
        "{err}"
    );
    let err = stderr(&fewstep(&eval_args(s(&missing), s(&model), "1")));
    assert!(err.contains("count"), "{err}");
}

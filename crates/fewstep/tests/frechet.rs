//! The Fréchet distance equals the reference computed with numpy/scipy (pytorch-fid's formula,
//! tools/reference/make_frechet_fixture.py), is zero for a set against itself, and refuses bad inputs.

mod common;

use fewstep::eval::frechet::feature_frechet_distance;

#[test]
fn frechet_distance_matches_scipy() {
    let text = std::fs::read_to_string(common::fixture("reference/frechet.json")).unwrap();
    let v: serde_json::Value = serde_json::from_str(&text).unwrap();
    let rows = |x: &serde_json::Value| -> Vec<Vec<f32>> {
        x.as_array()
            .unwrap()
            .iter()
            .map(|r| {
                r.as_array()
                    .unwrap()
                    .iter()
                    .map(|v| v.as_f64().unwrap() as f32)
                    .collect()
            })
            .collect()
    };
    for (i, case) in v["cases"].as_array().unwrap().iter().enumerate() {
        let (a, b) = (rows(&case["a"]), rows(&case["b"]));
        let want = case["fid"].as_f64().unwrap();
        let got = feature_frechet_distance(&a, &b).unwrap();
        assert!(
            (got - want).abs() < 1e-6 * want.max(1.0),
            "case {i}: {got} vs scipy {want}"
        );
        let zero = feature_frechet_distance(&a, &a).unwrap();
        assert!(zero.abs() < 1e-6, "case {i}: d(a, a) = {zero}");
    }
}

#[test]
fn frechet_distance_refuses_bad_inputs() {
    let one = vec![vec![1.0f32, 2.0]];
    let e = feature_frechet_distance(&one, &one)
        .unwrap_err()
        .to_string();
    assert!(e.contains("at least 2 rows"), "{e}");
    let a = vec![vec![1.0f32, 2.0], vec![0.0, 1.0]];
    let b = vec![vec![1.0f32, 2.0, 3.0], vec![0.0, 1.0, 2.0]];
    let e = feature_frechet_distance(&a, &b).unwrap_err().to_string();
    assert!(e.contains("widths 2 and 3"), "{e}");
}

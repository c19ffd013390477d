//! `tooltrain plot` end to end: a generated metrics file to a PNG, decoded and checked.

mod common;
use common::{stderr, tooltrain};

use std::collections::BTreeSet;
use std::path::Path;

/// 40 steps of a made-up run: loss and reward every step, val_loss every 5 steps,
/// a constant lr, a string key that is not plotted.
fn write_metrics(path: &Path) {
    let mut text = String::new();
    for step in 0..40 {
        let loss = 2.5 * (-(step as f64) / 15.0).exp() + 0.3;
        let reward = 1.0 - (-(step as f64) / 10.0).exp();
        let mut line = format!(
            "{{\"step\": {step}, \"loss\": {loss}, \"lr\": 1e-5, \"reward\": {reward}, \"phase\": \"train\""
        );
        if step % 5 == 0 {
            line.push_str(&format!(", \"val_loss\": {}", loss + 0.2));
        }
        line.push_str("}\n");
        text.push_str(&line);
    }
    std::fs::write(path, text).unwrap();
}

fn decode(path: &Path) -> image::RgbImage {
    image::open(path).expect("a PNG").to_rgb8()
}

/// Pixels within `tol` of `c` on every channel.
fn count_near(img: &image::RgbImage, c: [u8; 3], tol: i32) -> usize {
    img.pixels()
        .filter(|p| (0..3).all(|i| (p.0[i] as i32 - c[i] as i32).abs() <= tol))
        .count()
}

#[test]
fn plots_every_numeric_key_by_default() {
    let dir = tempfile::tempdir().unwrap();
    let metrics = dir.path().join("metrics.jsonl");
    write_metrics(&metrics);
    let o = tooltrain(&["plot", "--metrics", metrics.to_str().unwrap()]);
    assert!(o.status.success(), "{}", stderr(&o));
    // Default output: beside the metrics; 4 numeric keys -> 3 columns x 2 rows of 480x320.
    let png = dir.path().join("metrics.png");
    let img = decode(&png);
    assert_eq!(img.dimensions(), (1440, 640));
    assert!(
        stderr(&o).contains("loss, lr, reward, val_loss"),
        "{}",
        stderr(&o)
    );
    let colours: BTreeSet<[u8; 3]> = img.pixels().map(|p| p.0).collect();
    assert!(colours.len() > 20, "only {} colours", colours.len());
    // Every panel's line colour is drawn (tab10: blue, orange, green, red).
    for c in [[31, 119, 180], [255, 127, 14], [44, 160, 44], [214, 39, 40]] {
        assert!(count_near(&img, c, 8) > 100, "colour {c:?} missing");
    }
    // Text is rendered: dark anti-aliased pixels beyond the black axis lines.
    assert!(count_near(&img, [0, 0, 0], 60) > 2000);
    // Nothing but the metrics and the PNG are left in the directory.
    let names: BTreeSet<String> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(
        names,
        BTreeSet::from(["metrics.jsonl".into(), "metrics.png".into()])
    );
}

#[test]
fn chosen_keys_and_layout() {
    let dir = tempfile::tempdir().unwrap();
    let metrics = dir.path().join("metrics.jsonl");
    write_metrics(&metrics);
    let out = dir.path().join("curves.png");
    let o = tooltrain(&[
        "plot",
        "--metrics",
        metrics.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
        "--keys",
        "val_loss,reward",
        "--panel",
        "300x200",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let img = decode(&out);
    assert_eq!(img.dimensions(), (600, 200));
    // First panel blue, second orange; no third colour.
    assert!(count_near(&img, [31, 119, 180], 8) > 50);
    assert!(count_near(&img, [255, 127, 14], 8) > 50);
    assert_eq!(count_near(&img, [44, 160, 44], 8), 0);
}

#[test]
fn errors_name_the_line_or_the_key() {
    let dir = tempfile::tempdir().unwrap();
    let metrics = dir.path().join("metrics.jsonl");
    std::fs::write(
        &metrics,
        "{\"step\": 1, \"loss\": 2}\n{\"step\": 2, \"loss\": }\n",
    )
    .unwrap();
    let out = dir.path().join("p.png");
    let m = metrics.to_str().unwrap();
    let o = tooltrain(&["plot", "--metrics", m, "--out", out.to_str().unwrap()]);
    assert!(!o.status.success());
    assert!(stderr(&o).contains("metrics.jsonl:2:"), "{}", stderr(&o));
    assert!(!out.exists());

    write_metrics(&metrics);
    let o = tooltrain(&["plot", "--metrics", m, "--keys", "loss,nope"]);
    assert!(!o.status.success());
    assert!(stderr(&o).contains("\"nope\""), "{}", stderr(&o));
}

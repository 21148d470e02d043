//! The toy world fewstep trains its own models on: captioned RGB images of one or two anti-aliased shapes
//! (circle, square, triangle, star) in ten colours, two sizes and five positions on a coloured background,
//! deterministic from a seed. A second style draws the same scenes as thick outlines with a hatched fill —
//! the data of the fine-tune, as DreamShaper is a fine-tune of SD1.5.

use crate::image::RgbImage;

/// A small deterministic generator (SplitMix64, Steele et al. 2014): `z = (s += φ)`, then two
/// xor-shift-multiply rounds. Enough for sampling scenes; not for noise (see [`crate::rng`]).
#[derive(Debug, Clone)]
pub struct SceneRng(u64);

impl SceneRng {
    pub fn new(seed: u64) -> Self {
        Self(seed)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in `0..n` (by the high bits; the bias is below 2⁻³² for the small `n` used here).
    pub fn below(&mut self, n: usize) -> usize {
        (((self.next_u64() >> 32) * n as u64) >> 32) as usize
    }
}

/// The shapes of the world.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Shape {
    Circle,
    Square,
    Triangle,
    Star,
}

impl Shape {
    pub const ALL: [Shape; 4] = [Shape::Circle, Shape::Square, Shape::Triangle, Shape::Star];

    pub fn name(self) -> &'static str {
        match self {
            Shape::Circle => "circle",
            Shape::Square => "square",
            Shape::Triangle => "triangle",
            Shape::Star => "star",
        }
    }

    /// Whether the point `(x, y)`, in units of the shape's radius around its centre (y down), is inside:
    /// the unit disc; the square of half-side 0.85; the upward equilateral triangle inscribed in the unit
    /// circle (stretched 10% to balance its area); the five-pointed star with inner radius 0.45.
    fn contains(self, x: f32, y: f32) -> bool {
        match self {
            Shape::Circle => x * x + y * y <= 1.0,
            Shape::Square => x.abs() <= 0.85 && y.abs() <= 0.85,
            Shape::Triangle => {
                let (x, y) = (x / 1.1, y / 1.1 - 0.1);
                // Vertices (0, -1), (±√3/2, 1/2): inside when below both slanted edges and above the base.
                y <= 0.5 && (3f32.sqrt() * x.abs() - 1.0) <= y
            }
            Shape::Star => point_in_star(x, y, 1.0, 0.45),
        }
    }
}

/// Even–odd test against the star polygon whose 10 vertices alternate between radius `outer` and `inner`,
/// the first pointing up.
fn point_in_star(x: f32, y: f32, outer: f32, inner: f32) -> bool {
    let vertex = |i: usize| {
        let r = if i.is_multiple_of(2) { outer } else { inner };
        let a = std::f32::consts::PI * (i as f32 / 5.0) - std::f32::consts::FRAC_PI_2;
        (r * a.cos(), r * a.sin())
    };
    let mut inside = false;
    for i in 0..10 {
        let (x1, y1) = vertex(i);
        let (x2, y2) = vertex((i + 1) % 10);
        if (y1 > y) != (y2 > y) && x < x1 + (y - y1) * (x2 - x1) / (y2 - y1) {
            inside = !inside;
        }
    }
    inside
}

/// A named colour of the world.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Colour {
    pub name: &'static str,
    pub rgb: [u8; 3],
}

/// The ten colours, far enough apart to be told from one another after a lossy autoencoder.
pub const COLOURS: [Colour; 10] = [
    Colour {
        name: "red",
        rgb: [220, 30, 30],
    },
    Colour {
        name: "orange",
        rgb: [245, 140, 20],
    },
    Colour {
        name: "yellow",
        rgb: [240, 220, 40],
    },
    Colour {
        name: "green",
        rgb: [40, 170, 60],
    },
    Colour {
        name: "blue",
        rgb: [40, 80, 220],
    },
    Colour {
        name: "purple",
        rgb: [130, 50, 170],
    },
    Colour {
        name: "pink",
        rgb: [245, 130, 190],
    },
    Colour {
        name: "white",
        rgb: [245, 245, 245],
    },
    Colour {
        name: "black",
        rgb: [20, 20, 20],
    },
    Colour {
        name: "brown",
        rgb: [120, 75, 35],
    },
];

/// Large or small.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Size {
    Small,
    Large,
}

impl Size {
    pub fn name(self) -> &'static str {
        match self {
            Size::Small => "small",
            Size::Large => "large",
        }
    }

    /// Radius as a fraction of the image side.
    pub fn radius(self) -> f32 {
        match self {
            Size::Small => 0.12,
            Size::Large => 0.21,
        }
    }
}

/// Where an object sits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Position {
    Center,
    TopLeft,
    TopRight,
    BottomLeft,
    BottomRight,
}

impl Position {
    pub const CORNERS: [Position; 4] = [
        Position::TopLeft,
        Position::TopRight,
        Position::BottomLeft,
        Position::BottomRight,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Position::Center => "center",
            Position::TopLeft => "top left",
            Position::TopRight => "top right",
            Position::BottomLeft => "bottom left",
            Position::BottomRight => "bottom right",
        }
    }

    /// Centre as fractions of the image side `(x, y)`.
    pub fn centre(self) -> (f32, f32) {
        let (a, b) = (0.27, 0.73);
        match self {
            Position::Center => (0.5, 0.5),
            Position::TopLeft => (a, a),
            Position::TopRight => (b, a),
            Position::BottomLeft => (a, b),
            Position::BottomRight => (b, b),
        }
    }
}

/// How shapes are drawn.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Style {
    /// Solid shapes: the base model's world.
    Filled,
    /// Thick outlines with a diagonally hatched fill: the fine-tune's world.
    Outline,
}

/// One shape in a scene.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Object {
    pub shape: Shape,
    pub colour: Colour,
    pub size: Size,
    pub position: Position,
}

/// A scene: one or two objects on a background, in a style.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Scene {
    pub objects: Vec<Object>,
    pub background: Colour,
    pub style: Style,
}

impl Scene {
    /// A random scene: a background, then one object (anywhere; a lone centred object is the most common
    /// case) or two (in distinct corners), each of a colour other than the background's.
    pub fn random(rng: &mut SceneRng, style: Style) -> Self {
        let background = COLOURS[rng.below(COLOURS.len())];
        let object = |rng: &mut SceneRng, position| {
            let colour = loop {
                let c = COLOURS[rng.below(COLOURS.len())];
                if c != background {
                    break c;
                }
            };
            Object {
                shape: Shape::ALL[rng.below(4)],
                colour,
                size: if rng.below(2) == 0 {
                    Size::Small
                } else {
                    Size::Large
                },
                position,
            }
        };
        let objects = match rng.below(4) {
            0 | 1 => vec![object(rng, Position::Center)],
            2 => {
                let p = Position::CORNERS[rng.below(4)];
                vec![object(rng, p)]
            }
            _ => {
                let i = rng.below(4);
                let j = (i + 1 + rng.below(3)) % 4;
                let first = object(rng, Position::CORNERS[i]);
                vec![first, object(rng, Position::CORNERS[j])]
            }
        };
        Scene {
            objects,
            background,
            style,
        }
    }

    /// The caption naming everything drawn: "a large red circle on a blue background", "a small yellow
    /// star at the top left and a large green square at the bottom right on a pink background".
    pub fn caption(&self) -> String {
        let parts: Vec<String> = self
            .objects
            .iter()
            .map(|o| {
                let mut s = format!("a {} {} {}", o.size.name(), o.colour.name, o.shape.name());
                if o.position != Position::Center {
                    s.push_str(&format!(" at the {}", o.position.name()));
                }
                s
            })
            .collect();
        format!(
            "{} on a {} background",
            parts.join(" and "),
            self.background.name
        )
    }

    /// Renders the scene at `side`×`side`, anti-aliased by 4×4 supersampling: each pixel is the mean of
    /// its 16 sub-samples' colours.
    pub fn render(&self, side: usize) -> RgbImage {
        let mut img = RgbImage::new(side, side);
        const SUB: usize = 4;
        for py in 0..side {
            for px in 0..side {
                let mut acc = [0u32; 3];
                for sy in 0..SUB {
                    for sx in 0..SUB {
                        let x = (px as f32 + (sx as f32 + 0.5) / SUB as f32) / side as f32;
                        let y = (py as f32 + (sy as f32 + 0.5) / SUB as f32) / side as f32;
                        let c = self.colour_at(x, y, side);
                        for (a, &v) in acc.iter_mut().zip(&c) {
                            *a += v as u32;
                        }
                    }
                }
                let i = (py * side + px) * 3;
                for (d, a) in img.data[i..i + 3].iter_mut().zip(acc) {
                    *d = ((a + 8) / (SUB * SUB) as u32) as u8;
                }
            }
        }
        img
    }

    /// The colour at `(x, y)` in [0, 1]²: the last object covering the point, else the background. In the
    /// outline style an object covers its rim (outside the shape shrunk by a 2.5-pixel-thick band) and, in
    /// its interior, diagonal stripes 1.5 pixels wide every 5 pixels.
    fn colour_at(&self, x: f32, y: f32, side: usize) -> [u8; 3] {
        let mut colour = self.background.rgb;
        for o in &self.objects {
            let (cx, cy) = o.position.centre();
            let r = o.size.radius();
            let (u, v) = ((x - cx) / r, (y - cy) / r);
            if !o.shape.contains(u, v) {
                continue;
            }
            let covered = match self.style {
                Style::Filled => true,
                Style::Outline => {
                    let band = 2.5 / (side as f32 * r);
                    let k = 1.0 / (1.0 - band);
                    let rim = !o.shape.contains(u * k, v * k);
                    let stripe = ((x + y) * side as f32).rem_euclid(5.0) < 1.5;
                    rim || stripe
                }
            };
            if covered {
                colour = o.colour.rgb;
            }
        }
        colour
    }
}

/// `n` random scenes in `style`, the same for the same `seed` (the scenes of [`dataset`]).
pub fn scenes(seed: u64, n: usize, style: Style) -> Vec<Scene> {
    let mut rng = SceneRng::new(seed);
    (0..n).map(|_| Scene::random(&mut rng, style)).collect()
}

/// `n` captioned images of `side`×`side` in `style`, the same for the same `seed`.
pub fn dataset(seed: u64, n: usize, side: usize, style: Style) -> Vec<(RgbImage, String)> {
    scenes(seed, n, style)
        .into_iter()
        .map(|scene| (scene.render(side), scene.caption()))
        .collect()
}

"""Built-in demo data: coloured shapes drawn with NumPy, each with a matching caption.

Every sample is a function of integers only: `draw_batch(seed, index, ...)` and
`eval_set(seed, ...)` build their random generator from a `SeedSequence` keyed by
those integers, so the result never depends on call order, process or thread.
Training draws and the held-out evaluation set come from different spawn keys.

A caption reads "a small red circle at the top left" or "a large blue square in
the centre"; the zero-shot classes are colour x shape ("red circle"), the label
`shape * len(COLOURS) + colour`.
"""

from collections.abc import Callable

import numpy as np

SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "cross")
COLOURS: tuple[str, ...] = ("red", "green", "blue", "yellow", "purple", "white")
SIZES: tuple[str, ...] = ("small", "large")
POSITIONS: tuple[str, ...] = (
    "top left",
    "top right",
    "bottom left",
    "bottom right",
    "centre",
)
NUM_CLASSES = len(SHAPES) * len(COLOURS)

# Nominal RGB per colour, at least 120 apart from each other and far from the
# dark background, so jitter and noise never make two colours meet.
COLOUR_RGB = np.array(
    [
        (220, 40, 40),  # red
        (40, 190, 50),  # green
        (40, 80, 235),  # blue
        (245, 235, 35),  # yellow
        (160, 50, 200),  # purple
        (235, 235, 235),  # white
    ],
    dtype=np.float32,
)
# Shape radius as a fraction of the image side: the small shape still spans
# ~8 px at 32 px, and the large one (radius * 1.05 + jitter < 0.25) stays inside
# its quadrant.
SIZE_RADIUS = np.array([0.12, 0.19], dtype=np.float32)
# Shape centre (x, y) as a fraction of the image side, one row per position.
POSITION_CENTRE = np.array(
    [(0.25, 0.25), (0.75, 0.25), (0.25, 0.75), (0.75, 0.75), (0.5, 0.5)],
    dtype=np.float32,
)
MIN_IMAGE_SIZE = 16

_RADIUS_JITTER = 0.05  # relative; small and large radii stay far apart
_CENTRE_JITTER = 0.03  # fraction of the image side
_BACKGROUND_GREY = (0.0, 80.0)  # dark, so every colour (white included) stands out
_BACKGROUND_TINT = 12.0
_COLOUR_JITTER = 15.0
_NOISE_AMPLITUDE = 10  # uniform in [-10, 10]: std 6, mild but never zero
# Spawn keys of the two disjoint random streams.
_TRAIN_STREAM = 0
_EVAL_STREAM = 1


def caption(size: str, class_name: str, position: str) -> str:
    """The caption of one shape, e.g. 'a small red circle at the top left'."""
    where = "in the centre" if position == "centre" else f"at the {position}"
    return f"a {size} {class_name} {where}"


# Every size x position wording of the captions, so the zero-shot ensemble sees
# exactly the sentences the text tower was trained on.
ZEROSHOT_TEMPLATES: tuple[str, ...] = tuple(
    caption(size, "{}", position) for size in SIZES for position in POSITIONS
)


def class_names() -> list[str]:
    """Zero-shot class names ('red circle', ...), ordered by label."""
    return [f"{colour} {shape}" for shape in SHAPES for colour in COLOURS]


def draw_batch(seed: int, index: int, batch_size: int, image_size: int) -> dict:
    """Training batch `index` of stream `seed`: images [b, H, W, 3] uint8 and labels."""
    _check("seed", seed, 0)
    _check("index", index, 0)
    _check("batch_size", batch_size, 1)
    _check("image_size", image_size, MIN_IMAGE_SIZE)
    rng = np.random.default_rng(
        np.random.SeedSequence(seed, spawn_key=(_TRAIN_STREAM, index))
    )
    shape = rng.integers(len(SHAPES), size=batch_size)
    colour = rng.integers(len(COLOURS), size=batch_size)
    return _draw(rng, shape, colour, image_size)


def eval_set(seed: int, num_examples: int, image_size: int) -> dict:
    """Held-out images from a stream disjoint from `draw_batch`, classes balanced."""
    _check("seed", seed, 0)
    _check("num_examples", num_examples, 1)
    _check("image_size", image_size, MIN_IMAGE_SIZE)
    rng = np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(_EVAL_STREAM,)))
    # Balanced classes keep the zero-shot accuracy from leaning on whichever
    # class a small random draw happened to favour.
    label = rng.permutation(np.arange(num_examples) % NUM_CLASSES)
    return _draw(rng, label // len(COLOURS), label % len(COLOURS), image_size)


def _check(name: str, value: int, minimum: int) -> None:
    if not isinstance(value, int | np.integer) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")


# Signed distance (pixels, negative inside) of each shape, from offsets dx
# [b, 1, W] and dy [b, H, 1] to the shape's centre (y grows downwards) and
# radius [b, 1, 1]. The box and half-plane forms are exact on the edges, which
# is all the one-pixel anti-aliasing needs.
def _circle(dx: np.ndarray, dy: np.ndarray, radius: np.ndarray) -> np.ndarray:
    return np.sqrt(dx * dx + dy * dy) - radius


def _square(dx: np.ndarray, dy: np.ndarray, radius: np.ndarray) -> np.ndarray:
    # Half-side 0.85 r gives about the circle's area, so size reads the same.
    return np.maximum(np.abs(dx), np.abs(dy)) - 0.85 * radius


def _triangle(dx: np.ndarray, dy: np.ndarray, radius: np.ndarray) -> np.ndarray:
    # Isosceles, pointing up, filling the 2r x 2r box: an equilateral one of
    # side 2r has little more than half the circle's area and looks too small.
    slanted = (2.0 * np.abs(dx) - (dy + radius)) / np.sqrt(5.0)
    return np.maximum(slanted, dy - radius)


def _cross(dx: np.ndarray, dy: np.ndarray, radius: np.ndarray) -> np.ndarray:
    # A plus sign; arms 0.7 r wide stay several pixels thick on a small shape.
    along, across = np.abs(dx), np.abs(dy)
    horizontal = np.maximum(along - radius, across - 0.35 * radius)
    vertical = np.maximum(across - radius, along - 0.35 * radius)
    return np.minimum(horizontal, vertical)


# Indexed by shape id, in the order of SHAPES.
_SIGNED_DISTANCE: tuple[Callable[..., np.ndarray], ...] = (
    _circle,
    _square,
    _triangle,
    _cross,
)


def _draw(
    rng: np.random.Generator, shape: np.ndarray, colour: np.ndarray, image_size: int
) -> dict:
    """Draw one shape per image with the given shape and colour ids."""
    batch = len(shape)
    size = rng.integers(len(SIZES), size=batch)
    position = rng.integers(len(POSITIONS), size=batch)
    radius_jitter = rng.uniform(1 - _RADIUS_JITTER, 1 + _RADIUS_JITTER, batch)
    centre_jitter = rng.uniform(-_CENTRE_JITTER, _CENTRE_JITTER, (batch, 2))
    grey = rng.uniform(*_BACKGROUND_GREY, (batch, 1))
    tint = rng.uniform(-_BACKGROUND_TINT, _BACKGROUND_TINT, (batch, 3))
    colour_jitter = rng.uniform(-_COLOUR_JITTER, _COLOUR_JITTER, (batch, 3))
    # Uniform integer noise: several times cheaper than Gaussian floats, and
    # just as good at hiding exact pixel values.
    noise = rng.integers(
        -_NOISE_AMPLITUDE,
        _NOISE_AMPLITUDE + 1,
        (batch, image_size, image_size, 3),
        dtype=np.int8,
    )

    # Geometry in pixels, float32 throughout: the [b, H, W] maps dominate the cost.
    radius = (SIZE_RADIUS[size] * radius_jitter * image_size).astype(np.float32)
    centre = ((POSITION_CENTRE[position] + centre_jitter) * image_size).astype(
        np.float32
    )
    alpha = _coverage(shape, radius, centre, image_size)  # [b, H, W]

    # + 0.5 rounds, because the uint8 cast at the end truncates.
    background = (grey + tint + 0.5).astype(np.float32)  # [b, 3]
    contrast = (COLOUR_RGB[colour] + colour_jitter - grey - tint).astype(np.float32)
    image = np.empty((batch, image_size, image_size, 3), np.float32)
    # One channel at a time: NumPy broadcasts over a trailing axis of 3 slowly.
    for channel in range(3):
        image[..., channel] = (
            alpha * contrast[:, channel, None, None]
            + background[:, channel, None, None]
        )
    image += noise
    np.clip(image, 0, 255, out=image)
    captions = [
        caption(SIZES[s], f"{COLOURS[c]} {SHAPES[k]}", POSITIONS[p])
        for k, c, s, p in zip(
            shape.tolist(), colour.tolist(), size.tolist(), position.tolist()
        )
    ]
    return {
        "images": image.astype(np.uint8),
        "captions": captions,
        "shape": shape.astype(np.int32),
        "colour": colour.astype(np.int32),
        "label": (shape * len(COLOURS) + colour).astype(np.int32),
    }


def _coverage(
    shape: np.ndarray, radius: np.ndarray, centre: np.ndarray, image_size: int
) -> np.ndarray:
    """Each pixel's coverage by its image's shape, float32 [b, H, W] in [0, 1], from
    shape ids [b], radii [b] and centres (x, y) [b, 2] in pixels."""
    batch = len(shape)
    pixel = np.arange(image_size, dtype=np.float32) + 0.5  # pixel centres
    dx = pixel[None, None, :] - centre[:, 0, None, None]  # [b, 1, W]
    dy = pixel[None, :, None] - centre[:, 1, None, None]  # [b, H, 1]
    distance = np.empty((batch, image_size, image_size), np.float32)
    for shape_id, signed_distance in enumerate(_SIGNED_DISTANCE):
        members = shape == shape_id
        if members.any():
            distance[members] = signed_distance(
                dx[members], dy[members], radius[members, None, None]
            )
    # Pixel coverage from the signed distance: anti-aliased edges keep small
    # triangles and crosses recognisable at 32 px.
    return np.clip(0.5 - distance, 0.0, 1.0)

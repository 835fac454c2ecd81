"""The little world of the embedded model: one flat shape on a flat background, its prompt grammar and a scorer.

A scene is one shape (circle, square, triangle), small or big, of one colour, at one of nine places on a 3×3
grid, on a background of another colour. Prompts follow one grammar,

    "a {size} {colour} {shape} at the {place} on a {background} background"

with natural variants: the size and the background may be left out ("a red circle at the left"), "in the"
may replace "at the", and "an" goes before a vowel ("an orange square"). Scenes are drawn with signed
distance functions in torch, vectorised over a batch, so millions render fast on any device; anti-aliased
coverage is ``clamp(0.5 - sdf, 0, 1)`` with the distance in pixels. The scorer reads a generated image back
into (colour, background, shape, place) without knowing the prompt, so the same code checks ground truth and
model samples.
"""

from __future__ import annotations

import math
import re
from collections import deque
from dataclasses import asdict, dataclass

import numpy as np
import torch

__all__ = [
    "PLACE_CENTRES",
    "COLOURS",
    "IMAGE_SIZE",
    "PLACES",
    "SHAPES",
    "SIZES",
    "SceneBatch",
    "SceneParams",
    "SceneReading",
    "format_prompt",
    "grid_place",
    "parse_prompt",
    "prompt_table",
    "read_scene",
    "render_batch",
    "render_scene",
    "sample_scenes",
    "score_image",
    "score_images",
    "validation_prompts",
    "validation_scenes",
]

#: Side of a scene image in pixels (the embedded model generates 64×64).
IMAGE_SIZE = 64

SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
SIZES: tuple[str, ...] = ("small", "big")

#: The world's colours: CSS named colours, (R, G, B) in 0..255. The closest pair (orange, yellow) is 90 apart.
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (255, 0, 0),
    "green": (0, 128, 0),
    "blue": (0, 0, 255),
    "yellow": (255, 255, 0),
    "purple": (128, 0, 128),
    "orange": (255, 165, 0),
    "white": (255, 255, 255),
    "black": (0, 0, 0),
}
_COLOUR_NAMES: tuple[str, ...] = tuple(COLOURS)

#: Places on the 3×3 grid, row-major from the top left; index = 3 * row + column.
PLACES: tuple[str, ...] = (
    "top left",
    "top",
    "top right",
    "left",
    "center",
    "right",
    "bottom left",
    "bottom",
    "bottom right",
)

#: Where a shape's centre is put along each axis, as a fraction of the image side, for grid row/column 0, 1, 2.
#: Kept off the exact cell centres (1/6, 5/6) so big shapes stay inside the image.
PLACE_CENTRES: tuple[float, float, float] = (0.2, 0.5, 0.8)

#: Half-extent of a shape in pixels at 64×64 (circle radius; other shapes scaled to look the same size).
_SIZE_RADIUS = {"small": 5.0, "big": 8.5}
_SCALE_JITTER = 0.08  # size × U(1 - j, 1 + j)
_SHIFT_JITTER = 1.5  # centre ± U(j) pixels at 64×64
_SQUARE_HALF = 0.88  # square half-side / radius (a little under equal area with the circle, looks balanced)
_TRIANGLE_R = 1.25  # triangle circumradius / radius

_ALIASES = {"centre": "center", "middle": "center", "large": "big", "little": "small"}


@dataclass(frozen=True)
class SceneParams:
    """One scene: what a full prompt names. ``None`` in ``size`` or ``background`` means "not said"."""

    shape: str
    colour: str
    place: str
    size: str | None = None
    background: str | None = None

    def prompt(self, preposition: str = "at") -> str:
        """The scene's prompt in the world's grammar (see :func:`format_prompt`)."""
        return format_prompt(self, preposition)


def format_prompt(params: SceneParams, preposition: str = "at") -> str:
    """Write ``params`` as "a {size} {colour} {shape} {at|in} the {place} on a {background} background".

    Parts that are ``None`` are left out; "an" replaces "a" before a vowel.
    """
    if preposition not in ("at", "in"):
        raise ValueError(f"preposition must be 'at' or 'in', not {preposition!r}")
    words = [w for w in (params.size, params.colour, params.shape) if w]
    text = f"{_article(words[0])} {' '.join(words)} {preposition} the {params.place}"
    if params.background:
        text += f" on {_article(params.background)} {params.background} background"
    return text


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


_COLOUR_RE = "|".join(_COLOUR_NAMES)
_PLACE_RE = "|".join(sorted({*PLACES, "top centre", "centre", "middle"}, key=len, reverse=True))
_PROMPT_RE = re.compile(
    rf"^an?\s+(?:(?P<size>small|big|large|little)\s+)?(?P<colour>{_COLOUR_RE})\s+(?P<shape>circle|square|triangle)"
    rf"(?:\s+(?:at|in|on)\s+the\s+(?P<place>{_PLACE_RE}))?"
    rf"(?:\s*,?\s+(?:on|with)\s+an?\s+(?P<background>{_COLOUR_RE})\s+background)?\s*\.?$"
)


def parse_prompt(prompt: str) -> SceneParams:
    """Read a prompt of the world's grammar back into :class:`SceneParams`.

    Accepts the variants the model was trained on (size or background left out, "in the"/"at the", "a"/"an")
    and a few spellings ("centre", "middle", "large", "little", "on the left"), ignoring case and extra spaces.
    The place is required. Raises ``ValueError`` for a prompt outside the grammar, naming the grammar.
    """
    text = " ".join(prompt.lower().split())
    match = _PROMPT_RE.match(text)
    if match is None or match["place"] is None:
        raise ValueError(
            f"{prompt!r} is outside the embedded model's world; write "
            "'a {small|big} {colour} {circle|square|triangle} at the {place} on a {colour} background' "
            f"with colours {', '.join(_COLOUR_NAMES)} and places {', '.join(PLACES)}"
        )
    size = match["size"]
    place = _ALIASES.get(match["place"], match["place"])
    if place == "top centre":
        place = "top"
    params = SceneParams(
        shape=match["shape"],
        colour=match["colour"],
        place=place,
        size=_ALIASES.get(size, size) if size else None,
        background=match["background"],
    )
    if params.background == params.colour:
        raise ValueError(f"{prompt!r}: the shape and the background must differ in colour")
    return params


@dataclass
class SceneBatch:
    """A batch of sampled scenes as index tensors (all shape (B,)), on one device.

    ``size_said`` / ``background_said`` / ``in_the`` choose the prompt variant; ``scale``, ``dx``, ``dy`` are
    the jitter (size factor, centre shift in pixels at 64×64).
    """

    shape: torch.Tensor
    size: torch.Tensor
    colour: torch.Tensor
    background: torch.Tensor
    place: torch.Tensor
    scale: torch.Tensor
    dx: torch.Tensor
    dy: torch.Tensor
    size_said: torch.Tensor
    background_said: torch.Tensor
    in_the: torch.Tensor

    def __len__(self) -> int:
        return int(self.shape.shape[0])

    def to(self, device: torch.device | str) -> SceneBatch:
        """The same scenes with every index tensor on ``device``."""
        return SceneBatch(**{k: getattr(self, k).to(device) for k in self.__dataclass_fields__})

    def params(self, i: int) -> SceneParams:
        """Scene ``i`` as :class:`SceneParams` (with ``None`` where its prompt leaves a part out)."""
        return SceneParams(
            shape=SHAPES[int(self.shape[i])],
            colour=_COLOUR_NAMES[int(self.colour[i])],
            place=PLACES[int(self.place[i])],
            size=SIZES[int(self.size[i])] if bool(self.size_said[i]) else None,
            background=_COLOUR_NAMES[int(self.background[i])] if bool(self.background_said[i]) else None,
        )

    def prompts(self) -> list[str]:
        """The batch's prompts, in the variant each scene was sampled with."""
        return [
            format_prompt(self.params(i), "in" if bool(self.in_the[i]) else "at") for i in range(len(self))
        ]

    def prompt_index(self) -> torch.Tensor:
        """Index of each scene's prompt in :func:`prompt_table` (shape (B,))."""
        size_code = torch.where(self.size_said, self.size + 1, torch.zeros_like(self.size))
        bg_code = torch.where(self.background_said, self.background + 1, torch.zeros_like(self.background))
        index = self.shape
        index = index * 3 + size_code
        index = index * len(COLOURS) + self.colour
        index = index * len(PLACES) + self.place
        index = index * (len(COLOURS) + 1) + bg_code
        return index * 2 + self.in_the.long()


def shape_of_prompt_index(index: torch.Tensor) -> torch.Tensor:
    """The shape (index into :data:`SHAPES`) of each prompt index of :meth:`SceneBatch.prompt_index`, (B,):
    the shape is that mixed-radix number's leading digit."""
    per_shape = (
        3 * len(COLOURS) * len(PLACES) * (len(COLOURS) + 1) * 2
    )  # sizes × colours × places × bgs × preps
    return index // per_shape


def prompt_table() -> list[str]:
    """Every prompt the world's sampler can write, in the order :meth:`SceneBatch.prompt_index` numbers them.

    Includes the impossible combinations where background equals colour (never sampled) so the index is a
    plain mixed-radix number: 3 shapes × 3 sizes (unsaid, small, big) × 8 colours × 9 places × 9 backgrounds
    (unsaid + 8) × 2 prepositions = 11,664 strings.
    """
    out = []
    for shape in SHAPES:
        for size in (None, *SIZES):
            for colour in _COLOUR_NAMES:
                for place in PLACES:
                    for background in (None, *_COLOUR_NAMES):
                        for prep in ("at", "in"):
                            out.append(
                                format_prompt(SceneParams(shape, colour, place, size, background), prep)
                            )
    return out


def sample_scenes(
    n: int,
    generator: torch.Generator | None = None,
    device: torch.device | str = "cpu",
    p_size_said: float = 0.8,
    p_background_said: float = 0.8,
) -> SceneBatch:
    """Sample ``n`` scenes uniformly over shapes, sizes, colours, places and backgrounds (≠ colour).

    Draws happen on ``generator``'s device and are moved to ``device``, so a seed gives the same scenes on any
    machine when the generator is a CPU one.
    """
    gen_device = generator.device if generator is not None else torch.device("cpu")

    def randint(high: int) -> torch.Tensor:
        return torch.randint(high, (n,), generator=generator, device=gen_device)

    def uniform() -> torch.Tensor:
        return torch.rand(n, generator=generator, device=gen_device)

    n_col = len(COLOURS)
    colour = randint(n_col)
    background = (colour + 1 + randint(n_col - 1)) % n_col  # uniform over the other colours
    batch = SceneBatch(
        shape=randint(len(SHAPES)),
        size=randint(len(SIZES)),
        colour=colour,
        background=background,
        place=randint(len(PLACES)),
        scale=1.0 + _SCALE_JITTER * (2 * uniform() - 1),
        dx=_SHIFT_JITTER * (2 * uniform() - 1),
        dy=_SHIFT_JITTER * (2 * uniform() - 1),
        size_said=uniform() < p_size_said,
        background_said=uniform() < p_background_said,
        in_the=uniform() < 0.5,
    )
    device = torch.device(device)
    if device.type == "cuda" and gen_device.type == "cpu":  # pinned + non_blocking: no host sync per tensor
        return SceneBatch(
            **{k: v.pin_memory().to(device, non_blocking=True) for k, v in asdict(batch).items()}
        )
    return SceneBatch(**{k: v.to(device) for k, v in asdict(batch).items()})


def render_batch(batch: SceneBatch, image_size: int = IMAGE_SIZE) -> tuple[torch.Tensor, torch.Tensor]:
    """Draw a batch of scenes: images in [-1, 1] (B, 3, H, W) and shape coverage in [0, 1] (B, 1, H, W).

    Each shape is a signed distance function in pixels; coverage ``clamp(0.5 - sdf, 0, 1)`` anti-aliases
    its edge over one pixel. Sizes and jitter are given at 64×64 and scale with ``image_size``.
    """
    device = batch.shape.device
    k = image_size / IMAGE_SIZE
    palette, centres, radii = _constants(device)  # (8, 3) in [-1, 1], (3,) fractions, (2,) pixels at 64×64
    cx = centres[batch.place % 3] * image_size + batch.dx * k  # (B,)
    cy = centres[batch.place // 3] * image_size + batch.dy * k  # (B,)
    radius = radii[batch.size] * batch.scale * k  # (B,)

    coords = torch.arange(image_size, device=device, dtype=torch.float32) + 0.5  # pixel centres
    px = coords.view(1, 1, image_size) - cx.view(-1, 1, 1)  # (B, 1, W)
    py = coords.view(1, image_size, 1) - cy.view(-1, 1, 1)  # (B, H, 1)
    px, py = torch.broadcast_tensors(px, py)  # (B, H, W) each
    r = radius.view(-1, 1, 1)  # (B, 1, 1)

    sdf_circle = torch.sqrt(px**2 + py**2) - r
    half = _SQUARE_HALF * r
    qx, qy = px.abs() - half, py.abs() - half
    sdf_square = torch.sqrt(qx.clamp(min=0) ** 2 + qy.clamp(min=0) ** 2) + torch.maximum(qx, qy).clamp(max=0)
    sdf_triangle = _triangle_sdf(px, py, _TRIANGLE_R * r)

    kind = batch.shape.view(-1, 1, 1)  # (B, 1, 1)
    sdf = torch.where(kind == 0, sdf_circle, torch.where(kind == 1, sdf_square, sdf_triangle))  # (B, H, W)
    coverage = (0.5 - sdf).clamp(0, 1).unsqueeze(1)  # (B, 1, H, W)
    fg = palette[batch.colour].view(-1, 3, 1, 1)  # (B, 3, 1, 1)
    bg = palette[batch.background].view(-1, 3, 1, 1)  # (B, 3, 1, 1)
    return bg + (fg - bg) * coverage, coverage


_CONSTANTS: dict[torch.device, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}


def _constants(device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Palette, place centres and radii on ``device``, made once (a copy to a GPU each call would sync)."""
    if device not in _CONSTANTS:
        palette = torch.tensor(list(COLOURS.values()), dtype=torch.float32) / 127.5 - 1  # (8, 3)
        centres = torch.tensor(PLACE_CENTRES, dtype=torch.float32)  # (3,)
        radii = torch.tensor([_SIZE_RADIUS[s] for s in SIZES], dtype=torch.float32)  # (2,)
        _CONSTANTS[device] = (palette.to(device), centres.to(device), radii.to(device))
    return _CONSTANTS[device]


def _triangle_sdf(px: torch.Tensor, py: torch.Tensor, circumradius: torch.Tensor) -> torch.Tensor:
    """Signed distance (pixels) to an upright equilateral triangle whose bounding box is centred at the origin.

    Exact inside and along the edges (the max of the three half-plane distances); near the vertices outside it
    underestimates the distance, which only sharpens the corners' anti-aliasing. y points down.
    """
    R = circumradius
    y = (
        py - R / 4
    )  # move the centroid from the bbox centre (the apex is R above the centroid, the base R/2 below)
    s3 = math.sqrt(3.0)
    base = y - R / 2  # below the base → positive
    right = (s3 * px - y) / 2 - R / 2  # edge through the apex and the bottom-right vertex
    left = (-s3 * px - y) / 2 - R / 2
    return torch.maximum(base, torch.maximum(left, right))


def render_scene(
    params: SceneParams | str,
    seed: int = 0,
    image_size: int = IMAGE_SIZE,
    jitter: bool = True,
) -> tuple[np.ndarray, np.ndarray, SceneParams]:
    """Draw one scene: (image uint8 (H, W, 3), coverage float32 (H, W) in [0, 1], the parameters drawn).

    ``params`` is a :class:`SceneParams` or a prompt (parsed with :func:`parse_prompt`). Parts left unsaid (size,
    background) and the jitter are drawn from ``seed``; ``jitter=False`` centres the shape exactly. The
    returned parameters have every part filled in.
    """
    if isinstance(params, str):
        params = parse_prompt(params)
    gen = torch.Generator().manual_seed(seed)
    one = sample_scenes(1, gen)
    colour = _COLOUR_NAMES.index(params.colour)
    if params.background is not None:
        background = _COLOUR_NAMES.index(params.background)
    else:  # a random background other than the shape's colour
        background = (colour + 1 + int(torch.randint(len(COLOURS) - 1, (1,), generator=gen))) % len(COLOURS)
    size = SIZES.index(params.size) if params.size is not None else int(one.size[0])
    batch = SceneBatch(
        shape=torch.tensor([SHAPES.index(params.shape)]),
        size=torch.tensor([size]),
        colour=torch.tensor([colour]),
        background=torch.tensor([background]),
        place=torch.tensor([PLACES.index(params.place)]),
        scale=one.scale if jitter else torch.ones(1),
        dx=one.dx if jitter else torch.zeros(1),
        dy=one.dy if jitter else torch.zeros(1),
        size_said=torch.tensor([True]),
        background_said=torch.tensor([True]),
        in_the=torch.tensor([False]),
    )
    images, coverage = render_batch(batch, image_size)
    image = (
        ((images[0].permute(1, 2, 0) + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).numpy()
    )  # (H, W, 3)
    return image, coverage[0, 0].numpy(), batch.params(0)


def validation_scenes(n: int = 216, seed: int = 1234) -> SceneBatch:
    """A fixed validation set: ``n`` scenes from ``seed``, each shape × place pair equally often, full prompts.

    The default (216 = 3 shapes × 9 places × 8) is the held-out prompt set of the model card.
    """
    gen = torch.Generator().manual_seed(seed)
    batch = sample_scenes(n, gen, p_size_said=1.0, p_background_said=1.0)
    pairs = torch.arange(n) % (len(SHAPES) * len(PLACES))
    batch.shape = pairs // len(PLACES)
    batch.place = pairs % len(PLACES)
    return batch


def validation_prompts(n: int = 216, seed: int = 1234) -> list[str]:
    """Prompts of :func:`validation_scenes` (all parts said, "at the" or "in the" as sampled)."""
    return validation_scenes(n, seed).prompts()


# ----------------------------------------------------------------------------------------------------------
# Reading a scene back from pixels


@dataclass(frozen=True)
class SceneReading:
    """What :func:`read_scene` sees in an image; ``mask`` is the shape's pixels (H, W) bool."""

    colour: str
    background: str
    shape: str
    place: str
    size_px: float  # sqrt of the shape's area in pixels
    fill_ratio: float  # area / bounding-box area: circle ≈ 0.785, square ≈ 1, triangle ≈ 0.5
    mask: np.ndarray

    def as_params(self) -> SceneParams:
        """The reading as :class:`SceneParams` (size left unsaid)."""
        return SceneParams(self.shape, self.colour, self.place, None, self.background)


_PALETTE = np.array(list(COLOURS.values()), dtype=np.float32)  # (8, 3)
_DIFF_THRESHOLD = 45.0  # half the smallest distance between two world colours (orange-yellow, 90)


def grid_place(x: float, y: float, width: int, height: int) -> str:
    """The place on the 3×3 grid of the point (``x``, ``y``) in pixels (0 = left/top edge) of an image."""
    col = min(int(3 * x / width), 2)
    row = min(int(3 * y / height), 2)
    return PLACES[3 * row + col]


def read_scene(image: np.ndarray | torch.Tensor) -> SceneReading:
    """Segment an image of the world and name what is in it, without knowing the prompt.

    Background = median colour of the 2-pixel border; the shape = the largest 4-connected region whose colour
    differs from it by more than half the gap between the two closest world colours; colours = nearest world
    colour to the region's median; place = the region's centroid on the 3×3 grid; kind = fill ratio of the
    bounding box, after re-thresholding the region at half-way between background and shape colour.
    ``image`` is uint8 (H, W, 3), or float in [-1, 1] (H, W, 3) or (3, H, W).
    """
    rgb = _to_rgb255(image)  # (H, W, 3) float32 0..255
    h, w, _ = rgb.shape
    border = np.concatenate(
        [
            rgb[:2].reshape(-1, 3),
            rgb[-2:].reshape(-1, 3),
            rgb[:, :2].reshape(-1, 3),
            rgb[:, -2:].reshape(-1, 3),
        ]
    )  # (N, 3)
    bg_rgb = np.median(border, axis=0)
    distance = np.linalg.norm(rgb - bg_rgb, axis=-1)  # (H, W)
    region = _largest_component(distance > _DIFF_THRESHOLD)
    background = _nearest_colour(bg_rgb)
    if not region.any():
        empty = np.zeros((h, w), dtype=bool)
        return SceneReading("none", background, "none", "none", 0.0, 0.0, empty)
    fg_rgb = np.median(rgb[region], axis=0)
    # Re-threshold at half-way (alpha > 0.5), so area and bounding box follow the true edge, not the halo.
    span = fg_rgb - bg_rgb
    alpha = ((rgb - bg_rgb) @ span) / max(float(span @ span), 1e-6)  # (H, W)
    grown = _dilate(region)
    mask = _largest_component((alpha > 0.5) & grown)
    if not mask.any():
        mask = region
    ys, xs = np.nonzero(mask)
    bbox_area = (xs.max() - xs.min() + 1) * (ys.max() - ys.min() + 1)
    fill = float(mask.sum()) / float(bbox_area)
    kind = "triangle" if fill < 0.64 else ("circle" if fill < 0.89 else "square")
    return SceneReading(
        colour=_nearest_colour(fg_rgb),
        background=background,
        shape=kind,
        place=grid_place(xs.mean() + 0.5, ys.mean() + 0.5, w, h),
        size_px=float(np.sqrt(mask.sum())),
        fill_ratio=fill,
        mask=mask,
    )


def score_image(image: np.ndarray | torch.Tensor, prompt: str | SceneParams) -> dict[str, bool | None]:
    """Does ``image`` show what ``prompt`` asks? One bool per part: colour, background, shape, place.

    A part the prompt leaves unsaid (background) scores ``None``.
    """
    want = parse_prompt(prompt) if isinstance(prompt, str) else prompt
    got = read_scene(image)
    return {
        "colour": got.colour == want.colour,
        "background": None if want.background is None else got.background == want.background,
        "shape": got.shape == want.shape,
        "place": got.place == want.place,
    }


def score_images(images: list, prompts: list[str]) -> dict[str, float]:
    """Fraction right per part (colour, background, shape, place) and ``all`` (every said part right)."""
    if len(images) != len(prompts):
        raise ValueError(f"{len(images)} images but {len(prompts)} prompts")
    totals = {"colour": [], "background": [], "shape": [], "place": [], "all": []}
    for image, prompt in zip(images, prompts, strict=True):
        scores = score_image(image, prompt)
        for key, value in scores.items():
            if value is not None:
                totals[key].append(value)
        totals["all"].append(all(v for v in scores.values() if v is not None))
    return {k: float(np.mean(v)) if v else float("nan") for k, v in totals.items()}


def _to_rgb255(image: np.ndarray | torch.Tensor) -> np.ndarray:
    if isinstance(image, torch.Tensor):
        image = image.detach().float().cpu().numpy()
    elif hasattr(image, "convert"):  # a PIL image
        image = np.asarray(image.convert("RGB"))
    image = np.asarray(image)
    if image.ndim != 3:
        raise ValueError(f"expected an image (H, W, 3) or (3, H, W), got shape {image.shape}")
    if image.shape[0] == 3 and image.shape[-1] != 3:
        image = image.transpose(1, 2, 0)  # (3, H, W) -> (H, W, 3)
    if image.dtype == np.uint8:
        return image.astype(np.float32)
    return ((np.clip(image, -1, 1) + 1) * 127.5).astype(np.float32)


def _nearest_colour(rgb: np.ndarray) -> str:
    return _COLOUR_NAMES[int(np.argmin(np.linalg.norm(_PALETTE - rgb, axis=-1)))]


def _dilate(mask: np.ndarray) -> np.ndarray:
    out = mask.copy()
    out[1:] |= mask[:-1]
    out[:-1] |= mask[1:]
    out[:, 1:] |= mask[:, :-1]
    out[:, :-1] |= mask[:, 1:]
    return out


def _largest_component(mask: np.ndarray) -> np.ndarray:
    """The largest 4-connected region of a bool mask (H, W), as a bool mask; empty if ``mask`` is empty."""
    h, w = mask.shape
    labels = np.zeros((h, w), dtype=np.int32)
    best_label, best_size, current = 0, 0, 0
    for y0, x0 in zip(*np.nonzero(mask), strict=True):
        if labels[y0, x0]:
            continue
        current += 1
        labels[y0, x0] = current
        queue, size = deque([(y0, x0)]), 0
        while queue:
            y, x = queue.popleft()
            size += 1
            for ny, nx in ((y - 1, x), (y + 1, x), (y, x - 1), (y, x + 1)):
                if 0 <= ny < h and 0 <= nx < w and mask[ny, nx] and not labels[ny, nx]:
                    labels[ny, nx] = current
                    queue.append((ny, nx))
        if size > best_size:
            best_label, best_size = current, size
    return labels == best_label if best_size else np.zeros((h, w), dtype=bool)

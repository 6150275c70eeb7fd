"""A small synthetic world where text truly controls the pictures: cartoon people, drawn procedurally.

A person is a combination of traits - hair colour, hair length, skin tone, glasses, beard - drawn in a scene
(plain, beach, forest, night), a style (photo, painting), with an expression (smiling, serious), a pose (where the
head sits, how big) and a light level. Captions say all of it ("a painting of a person with long red hair, dark
skin, glasses and a beard, smiling, at night"); some also start with a first name, which is never tied to a
trait, so that names mean "a person" and nothing more.

One identity, :data:`HELD_OUT`, never appears in the captions or the images the world model was trained on: it
is the person textual inversion has to learn. :class:`TraitReader` (a small classifier, trained by the world's
build script) reads the traits back from pixels, which is how tistudio measures learning.

Everything here is deterministic given a random.Random; images are 64x64 RGB.
"""

from __future__ import annotations

import random
from dataclasses import asdict, dataclass
from typing import Any

from PIL import Image, ImageDraw, ImageFilter

SIZE = 64
DRAW = 128  # drawn at 2x, then reduced with Lanczos for smooth edges

HAIR = {
    "black": (28, 24, 24),
    "brown": (112, 68, 34),
    "blond": (238, 204, 102),
    "red": (204, 58, 28),
    "white": (236, 236, 236),
}
HAIR_LENGTH = ("short", "long")
SKIN = {"light": (246, 212, 182), "tan": (206, 150, 104), "dark": (118, 74, 48)}
EXPRESSIONS = ("smiling", "serious")
SCENES = ("plain", "beach", "forest", "night")
STYLES = ("photo", "painting")
FRAME = (176, 136, 40)  # a painting's gold frame
SHIRTS = ((70, 90, 150), (150, 60, 70), (80, 120, 80), (110, 110, 120))
NAMES = (
    "james",
    "mary",
    "john",
    "linda",
    "robert",
    "susan",
    "michael",
    "karen",
    "david",
    "lisa",
    "william",
    "nancy",
    "richard",
    "betty",
    "thomas",
    "sandra",
    "charles",
    "ashley",
    "daniel",
    "emily",
    "matthew",
    "anna",
    "anthony",
    "laura",
    "mark",
    "sarah",
    "paul",
    "julia",
    "steven",
    "emma",
    "andrew",
    "olivia",
    "peter",
    "sophia",
    "george",
    "grace",
    "kevin",
    "alice",
    "brian",
    "helen",
)
TRAIT_NAMES = ("hair", "length", "skin", "glasses", "beard")


@dataclass(frozen=True)
class Person:
    hair: str
    length: str
    skin: str
    glasses: bool
    beard: bool

    def describe(self) -> str:
        """'a person with long red hair, dark skin, glasses and a beard'."""
        extras = [x for x, on in (("glasses", self.glasses), ("a beard", self.beard)) if on]
        parts = [f"{self.length} {self.hair} hair", f"{self.skin} skin", *extras]
        text = ", ".join(parts[:-1]) + (" and " if len(parts) > 1 else "") + parts[-1]
        return f"a person with {text}"

    def traits(self) -> dict[str, Any]:
        return asdict(self)


# The person textual inversion learns in the demo: this combination never occurs in the world model's training.
HELD_OUT = Person(hair="red", length="long", skin="dark", glasses=True, beard=True)


def random_person(rng: random.Random, allow_held_out: bool = False) -> Person:
    while True:
        person = Person(
            hair=rng.choice(list(HAIR)),
            length=rng.choice(HAIR_LENGTH),
            skin=rng.choice(list(SKIN)),
            glasses=rng.random() < 0.5,
            beard=rng.random() < 0.5,
        )
        if allow_held_out or person != HELD_OUT:
            return person


@dataclass(frozen=True)
class Scene:
    expression: str = "serious"
    scene: str = "plain"
    style: str = "photo"
    dx: float = 0.0  # head offset, in 64-px units
    dy: float = 0.0
    scale: float = 1.0
    light: float = 1.0
    shirt: int = 0


def random_scene(rng: random.Random, scenes: tuple[str, ...] = SCENES, styles: tuple[str, ...] = STYLES) -> Scene:
    return Scene(
        expression=rng.choice(EXPRESSIONS),
        scene=rng.choice(scenes),
        style=rng.choice(styles),
        dx=rng.uniform(-5, 5),
        dy=rng.uniform(-4, 4),
        scale=rng.uniform(0.9, 1.1),
        light=rng.uniform(0.8, 1.15),
        shirt=rng.randrange(len(SHIRTS)),
    )


def caption(person: Person | None, scene: Scene, name: str | None = None) -> str:
    """The world's caption: '[a photo|a painting] of [NAME, ]<person>, <expression>[, <scene>]'."""
    kind = "a painting" if scene.style == "painting" else "a photo"
    who = person.describe() if person is not None else ""
    if name and who:
        who = f"{name}, {who}"
    elif name:
        who = name
    text = f"{kind} of {who}, {scene.expression}"
    place = {"plain": "", "beach": "on a beach", "forest": "in a forest", "night": "at night"}[scene.scene]
    return f"{text}, {place}" if place else text


def _shade(colour: tuple[int, int, int], light: float) -> tuple[int, int, int]:
    return tuple(max(0, min(255, round(c * light))) for c in colour)  # type: ignore[return-value]


def _background(draw: ImageDraw.ImageDraw, scene: str) -> None:
    s = DRAW
    if scene == "plain":
        draw.rectangle([0, 0, s, s], fill=(128, 128, 132))
    elif scene == "beach":
        draw.rectangle([0, 0, s, s * 0.5], fill=(130, 190, 238))
        draw.rectangle([0, s * 0.5, s, s * 0.62], fill=(40, 110, 190))
        draw.rectangle([0, s * 0.62, s, s], fill=(232, 212, 152))
    elif scene == "forest":
        draw.rectangle([0, 0, s, s], fill=(44, 112, 52))
        for x in (0.08, 0.27, 0.74, 0.92):
            draw.rectangle([(x - 0.035) * s, s * 0.2, (x + 0.035) * s, s], fill=(92, 60, 30))
        for x in (0.08, 0.27, 0.74, 0.92):
            draw.ellipse([(x - 0.16) * s, -0.04 * s, (x + 0.16) * s, s * 0.32], fill=(30, 90, 38))
    else:  # night
        draw.rectangle([0, 0, s, s], fill=(18, 22, 58))
        draw.ellipse([s * 0.74, s * 0.06, s * 0.92, s * 0.24], fill=(236, 232, 200))


def render(person: Person, scene: Scene, hat: bool = False) -> Image.Image:
    """A 64x64 picture of a person in a scene; with `hat`, wearing :data:`HAT` (which the world never showed)."""
    s = DRAW
    image = Image.new("RGB", (s, s))
    draw = ImageDraw.Draw(image)
    _background(draw, scene.scene)
    _figure(draw, person, scene)
    if hat:
        _hat(draw, scene)
    small = image.resize((SIZE, SIZE), Image.LANCZOS)
    if scene.style == "painting":  # flattened colours, soft brushy edges, a gold frame
        small = small.filter(ImageFilter.SMOOTH_MORE).quantize(20).convert("RGB")
        ImageDraw.Draw(small).rectangle([0, 0, SIZE - 1, SIZE - 1], outline=FRAME, width=4)
    return small


TALL = 106  # a tall frame's height: 64 x 106, the aspect of the 48x80 bucket (0.6)
TALL_SHIRT = 1  # the shirt of the tall frames' figure: red, a colour no background has


def render_tall(person: Person, scene: Scene) -> Image.Image:
    """The person in a tall 64 x TALL frame (a portrait: aspect-ratio buckets, issue 32): the frame's centre square is
    :func:`render`'s picture of the head and shoulders, and the frame goes on above it (the scene) and below it,
    where the figure's torso, in the shirt :data:`TALL_SHIRT`, reaches the bottom - what a square crop throws away."""
    k = DRAW / SIZE
    s, height = DRAW, round(TALL * k)
    image = Image.new("RGB", (s, height))
    draw = ImageDraw.Draw(image)
    square = Image.new("RGB", (s, s))
    _background(ImageDraw.Draw(square), scene.scene)
    top = (height - s) // 2
    # the scene's top and bottom rows stretched over the frame's extra rows, then its square in the middle
    image.paste(square.crop((0, 0, s, 1)).resize((s, top + 1)), (0, 0))
    image.paste(square.crop((0, s - 1, s, s)).resize((s, height - top - s + 1)), (0, top + s - 1))
    image.paste(square, (0, top))
    dressed = Scene(**{**asdict(scene), "shirt": TALL_SHIRT})
    cx, cy = s / 2 + scene.dx * k, top + s * 0.52 + scene.dy * k
    r = 19 * k * scene.scale
    draw.rounded_rectangle(
        [cx - 1.3 * r, cy + 1.6 * r, cx + 1.3 * r, height + r],
        radius=0.4 * r,
        fill=_shade(SHIRTS[TALL_SHIRT], scene.light),
    )
    figure = Image.new("RGB", (s, s))
    _background(ImageDraw.Draw(figure), scene.scene)
    _figure(ImageDraw.Draw(figure), person, dressed)
    shape = Image.new("RGB", (s, s))
    _figure(ImageDraw.Draw(shape), person, dressed, silhouette=True)
    image.paste(figure, (0, top), shape.convert("L"))
    return image.resize((SIZE, TALL), Image.LANCZOS)


def torso_share(image: Image.Image) -> float:
    """The share of a picture's bottom sixth, across its middle half, that is red - red well above green and blue,
    and lit - whether the figure below the face is drawn. The world's VAE draws the shirt's red (150, 60, 70) as a
    brick red near (145, 78, 60); no background is red (sand, sea, forest, trunks, night, a painting's gold frame),
    and the red hair never reaches the bottom of a tall frame."""
    import numpy as np

    rgb = np.asarray(image.convert("RGB"), dtype=np.float32) / 255
    rows, cols = rgb.shape[0], rgb.shape[1]
    part = rgb[rows - max(1, rows // 6) :, cols // 4 : cols - cols // 4]
    r, g, b = part[..., 0], part[..., 1], part[..., 2]
    red = (r - np.maximum(g, b) > 45 / 255) & (r > 0.4)
    return float(red.mean())


def person_mask(person: Person, scene: Scene) -> Image.Image:
    """The exact silhouette of the person in :func:`render`'s picture (64x64, mode L: 255 the person - head, hair,
    beard and shoulders - 0 the scene), drawn with the same shapes; a painting's frame is scene."""
    s = DRAW
    image = Image.new("RGB", (s, s))
    _figure(ImageDraw.Draw(image), person, scene, silhouette=True)
    small = image.convert("L").resize((SIZE, SIZE), Image.LANCZOS)
    if scene.style == "painting":
        ImageDraw.Draw(small).rectangle([0, 0, SIZE - 1, SIZE - 1], outline=0, width=4)
    return small


def face_box(scene: Scene) -> tuple[float, float, float, float]:
    """Where a face detector would box the person's face in :func:`render`'s picture (x1, y1, x2, y2 in its 64
    pixels): brows to chin, cheek to cheek."""
    cx, cy, r = SIZE / 2 + scene.dx, SIZE * 0.52 + scene.dy, 19 * scene.scale
    return cx - 0.8 * r, cy - 0.5 * r, cx + 0.8 * r, cy + 0.95 * r


def _figure(draw: ImageDraw.ImageDraw, person: Person, scene: Scene, silhouette: bool = False) -> None:
    """The person, drawn over the background (every shape in white for a silhouette)."""
    s = DRAW
    k = s / SIZE
    cx, cy = s / 2 + scene.dx * k, s * 0.52 + scene.dy * k
    r = 19 * k * scene.scale
    light = scene.light
    hair, skin = _shade(HAIR[person.hair], light), _shade(SKIN[person.skin], light)
    shirt = _shade(SHIRTS[scene.shirt], light)
    if silhouette:
        draw = _Silhouette(draw)  # type: ignore[assignment]
    # Shoulders, long hair behind the head, the head, the beard, the hair on top.
    draw.ellipse([cx - 1.6 * r, cy + 0.85 * r, cx + 1.6 * r, cy + 3.2 * r], fill=shirt)
    if person.length == "long":
        draw.rounded_rectangle([cx - 1.22 * r, cy - 0.9 * r, cx + 1.22 * r, cy + 1.45 * r], radius=0.5 * r, fill=hair)
    draw.ellipse([cx - r, cy - 1.05 * r, cx + r, cy + 1.05 * r], fill=skin)
    if person.beard:  # a full beard from ear to ear, with sideburns, and the mouth showing through
        draw.chord([cx - 1.0 * r, cy - 0.45 * r, cx + 1.0 * r, cy + 1.2 * r], 0, 180, fill=hair)
        draw.rectangle([cx - 1.0 * r, cy - 0.25 * r, cx - 0.72 * r, cy + 0.4 * r], fill=hair)
        draw.rectangle([cx + 0.72 * r, cy - 0.25 * r, cx + 1.0 * r, cy + 0.4 * r], fill=hair)
        draw.ellipse([cx - 0.36 * r, cy + 0.28 * r, cx + 0.36 * r, cy + 0.58 * r], fill=skin)
    draw.chord([cx - 1.08 * r, cy - 1.2 * r, cx + 1.08 * r, cy + 0.25 * r], 180, 360, fill=hair)
    # Eyes, glasses, mouth.
    eye_y = cy - 0.02 * r
    for side in (-1, 1):
        ex = cx + side * 0.4 * r
        if person.glasses:  # thick black frames with pale blue lenses
            draw.ellipse(
                [ex - 0.33 * r, eye_y - 0.28 * r, ex + 0.33 * r, eye_y + 0.28 * r],
                fill=_shade((172, 214, 242), light),
                outline=(10, 10, 14),
                width=max(2, round(0.12 * r)),
            )
        draw.ellipse([ex - 0.09 * r, eye_y - 0.09 * r, ex + 0.09 * r, eye_y + 0.09 * r], fill=(20, 20, 24))
    if person.glasses:
        draw.line([cx - 0.1 * r, eye_y, cx + 0.1 * r, eye_y], fill=(10, 10, 14), width=max(2, round(0.1 * r)))
    mouth_y = cy + 0.42 * r
    if scene.expression == "smiling":
        draw.arc(
            [cx - 0.3 * r, mouth_y - 0.25 * r, cx + 0.3 * r, mouth_y + 0.12 * r],
            20,
            160,
            fill=(150, 30, 40),
            width=max(2, round(0.08 * r)),
        )
    else:
        draw.line([cx - 0.22 * r, mouth_y, cx + 0.22 * r, mouth_y], fill=(120, 40, 40), width=max(2, round(0.06 * r)))


# A blue hat: a shape no picture of the world model's training had, so no word can point at it - what pivotal
# tuning's LoRA is for (demo/run.py's hat proof). Its colour is the sea's, which the world's VAE draws well (a colour
# new to it, like purple, comes back grey: the VAE would hide the hat from any word or LoRA); nothing else blue is
# ever drawn where the hat sits (the sea starts at the middle of the picture; the sky is paler, the night darker).
HAT = (40, 110, 190)
HAT_ROWS = 30  # the hat sits in the top 30 rows of a 64-pixel picture (the head's top at most 4 px below centre)


def _hat(draw: ImageDraw.ImageDraw, scene: Scene) -> None:
    """A round crown over the top of the head and a brim across the brow."""
    k = DRAW / SIZE
    cx, cy = DRAW / 2 + scene.dx * k, DRAW * 0.52 + scene.dy * k
    r = 19 * k * scene.scale
    colour = _shade(HAT, scene.light)
    draw.chord([cx - 0.95 * r, cy - 1.75 * r, cx + 0.95 * r, cy - 0.1 * r], 180, 360, fill=colour)
    draw.rectangle([cx - 1.35 * r, cy - 0.98 * r, cx + 1.35 * r, cy - 0.72 * r], fill=colour)


def hat_share(image: Image.Image) -> float:
    """The share of the top rows' pixels in the hat's blue: a blue hue (200-250 degrees), saturated (not the sky's
    pale blue) and bright enough (not the night's dark blue)."""
    import numpy as np

    rgb = np.asarray(image.convert("RGB").resize((SIZE, SIZE), Image.BILINEAR), dtype=np.float32)[:HAT_ROWS] / 255
    high, low = rgb.max(axis=-1), rgb.min(axis=-1)
    saturation = (high - low) / np.maximum(high, 1e-6)
    r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]
    hue = np.degrees(np.arctan2(np.sqrt(3) * (g - b), 2 * r - g - b)) % 360
    blue = (hue >= 200) & (hue <= 250) & (saturation > 0.55) & (high > 0.45)
    return float(blue.mean())


class _Silhouette:
    """An ImageDraw stand-in that draws every shape (and its outline) in white."""

    def __init__(self, draw: ImageDraw.ImageDraw) -> None:
        self.draw = draw

    def __getattr__(self, shape: str) -> Any:
        method = getattr(self.draw, shape)

        def white(*args: Any, **kwargs: Any) -> Any:
            for key in ("fill", "outline"):
                if key in kwargs:
                    kwargs[key] = (255, 255, 255)
            return method(*args, **kwargs)

        return white


def sample(rng: random.Random, name_rate: float = 0.4) -> tuple[Image.Image, str, Person, Scene]:
    """One training example of the world (never the held-out person)."""
    person = random_person(rng)
    scene = random_scene(rng)
    name = rng.choice(NAMES) if rng.random() < name_rate else None
    return render(person, scene), caption(person, scene, name), person, scene


# ----------------------------------------------------------------------------------------------------------------
# Reading traits from pixels


def trait_reader_module() -> Any:
    """A small CNN with one head per trait (its weights come from the world model's build)."""
    from torch import nn

    class TraitReader(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.features = nn.Sequential(
                nn.Conv2d(3, 32, 3, padding=1),
                nn.GELU(),
                nn.MaxPool2d(2),
                nn.Conv2d(32, 64, 3, padding=1),
                nn.GELU(),
                nn.MaxPool2d(2),
                nn.Conv2d(64, 96, 3, padding=1),
                nn.GELU(),
                nn.MaxPool2d(2),
                nn.Conv2d(96, 128, 3, padding=1),
                nn.GELU(),
                nn.AdaptiveAvgPool2d(2),
                nn.Flatten(),
            )
            self.hair = nn.Linear(512, len(HAIR))
            self.length = nn.Linear(512, len(HAIR_LENGTH))
            self.skin = nn.Linear(512, len(SKIN))
            self.glasses = nn.Linear(512, 2)
            self.beard = nn.Linear(512, 2)

        def forward(self, x):  # x: [batch, 3, 64, 64] in [-1, 1]
            h = self.features(x)
            return {name: getattr(self, name)(h) for name in TRAIT_NAMES}

    return TraitReader()


def decode_traits(logits: dict[str, Any], index: int) -> Person:
    return Person(
        hair=list(HAIR)[int(logits["hair"][index].argmax())],
        length=HAIR_LENGTH[int(logits["length"][index].argmax())],
        skin=list(SKIN)[int(logits["skin"][index].argmax())],
        glasses=bool(int(logits["glasses"][index].argmax())),
        beard=bool(int(logits["beard"][index].argmax())),
    )


def trait_targets(people: list[Person]) -> dict[str, Any]:
    import torch

    return {
        "hair": torch.tensor([list(HAIR).index(p.hair) for p in people]),
        "length": torch.tensor([HAIR_LENGTH.index(p.length) for p in people]),
        "skin": torch.tensor([list(SKIN).index(p.skin) for p in people]),
        "glasses": torch.tensor([int(p.glasses) for p in people]),
        "beard": torch.tensor([int(p.beard) for p in people]),
    }


def to_tensor(images: list[Image.Image]) -> Any:
    import numpy as np
    import torch

    array = np.stack(
        [np.asarray(i.convert("RGB").resize((SIZE, SIZE), Image.BILINEAR), dtype=np.float32) for i in images]
    )
    return torch.from_numpy(array).permute(0, 3, 1, 2) / 127.5 - 1.0


GUIDANCE = 3.0  # classifier-free guidance of the demo's pictures and of the likeness measure

# The seeds of the demo's likeness: 16 x 4 prompts = 64 pictures per evaluation; none of them is a benchmark judge's.
LIKENESS_SEEDS = tuple(range(500, 516))

# Prompts the demo's person is never trained with (the photos show no night and no painting).
EVAL_PROMPTS = (
    "a painting of {name}, smiling",
    "a photo of {name}, serious, at night",
    "a painting of {name}, serious, in a forest",
    "a photo of {name}, smiling, at night",
)


def load_trait_reader(folder: Any) -> Any:
    """The trait reader of an expanded world model folder."""
    from pathlib import Path

    from safetensors.torch import load_file

    reader = trait_reader_module()
    reader.load_state_dict(load_file(str(Path(folder) / "trait-reader.safetensors")))
    return reader.eval().requires_grad_(False)


def read_logits(reader: Any, images: list[Image.Image]) -> dict[str, Any]:
    """The reader's logits, trait by trait, for a list of pictures."""
    import torch

    with torch.no_grad():
        return reader(to_tensor(images))


def read_people(reader: Any, images: list[Image.Image]) -> list[Person]:
    logits = read_logits(reader, images)
    return [decode_traits(logits, i) for i in range(len(images))]


def person_chances(logits: dict[str, Any], person: Person) -> list[float]:
    """The reader's probability that each picture shows `person`: the product over the traits of the probability
    its head gives the person's value. A finer reading than the yes/no of :func:`read_people` (which is the
    most probable value of each trait): a picture at the edge of a trait moves it a little, not all the way.
    `logits`: :func:`read_logits` of the pictures."""
    import torch

    count = len(logits["hair"])
    wanted = trait_targets([person] * count)
    chance = torch.ones(count)
    for trait in TRAIT_NAMES:
        chance *= logits[trait].softmax(-1).gather(1, wanted[trait][:, None])[:, 0]
    return chance.tolist()


def read_person(reader: Any, photos: list[Image.Image]) -> Person:
    """Who the photos show, as the reader reads them: each trait's most common value."""
    seen = read_people(reader, photos)

    def majority(trait: str) -> Any:
        values = [getattr(p, trait) for p in seen]
        return max(dict.fromkeys(values), key=values.count)

    return Person(**{trait: majority(trait) for trait in TRAIT_NAMES})


def photo_likeness(
    folder: Any, photos: list[Image.Image], name: str, on_pictures: Any = None, cfg: float = GUIDANCE
) -> Any:
    """The likeness a trainer can measure on this world: the person read from the training photos, 64 pictures
    (EVAL_PROMPTS x LIKENESS_SEEDS) read as the reader's average probability that they show that person."""
    person = read_person(load_trait_reader(folder), photos)
    score = likeness_scorer(folder, person, name, seeds=LIKENESS_SEEDS, cfg=cfg, on_pictures=on_pictures, chances=True)
    # what options.json and the run report say judged the pictures (the demo report said "the caller's measure")
    score.kind = "the demo world's trait reader (the person in 64 pictures from unseen prompts)"
    return score


def likeness_scorer(
    folder: Any,
    person: Person,
    name: str,
    prompts: tuple[str, ...] = EVAL_PROMPTS,
    seeds: tuple[int, ...] = tuple(range(1000, 1008)),
    steps: int = 20,
    cfg: float = GUIDANCE,
    on_pictures: Any = None,
    chances: bool = False,
) -> Any:
    """score(model, encoder) -> the share of pictures, from unseen prompts and seeds, that show `person` (with
    `chances`: the reader's probability that a picture does, averaged - the same pictures read more finely).

    The pictures are drawn the way the demo draws its images, with classifier-free guidance 3: the small model's
    unguided samples (cfg 1) are loose - even prompts that describe a person in words show all five traits in
    only about half of them - and guidance brings out what the prompt says. `on_pictures(shown, chances)`, if
    given, receives each picture's verdict and the reader's probability (:func:`person_chances`), in order.
    """
    reader = load_trait_reader(folder)

    def score(model: Any, encoder: Any) -> float:
        from tistudio.generate.images import Renderer, SamplingParams

        renderer = Renderer(model, encoder)
        images = []
        for prompt in prompts:
            images += renderer.render(
                SamplingParams(
                    prompt=prompt.format(name=name),
                    steps=steps,
                    sampler="DDIM",
                    cfg=cfg,
                    width=SIZE,
                    height=SIZE,
                    seeds=tuple(seeds),
                )
            )
        logits = read_logits(reader, images)
        shown = [decode_traits(logits, i) == person for i in range(len(images))]
        probabilities = person_chances(logits, person)
        if on_pictures is not None:
            on_pictures(shown, probabilities)
        return sum(probabilities if chances else shown) / len(shown)

    return score


# ----------------------------------------------------------------------------------------------------------------
# Reading the place and the style from pixels


def _scene_features(image: Image.Image) -> list[float]:
    """What tells the place and the style apart, away from the person: the mean colour of the outer ring (a
    painting's gold frame) and the median colour of three strips just inside it that the head and hair rarely
    reach (the top: sky, canopy, night or grey; the upper left and right edges), each in 0..1."""
    import numpy as np

    pixels = np.asarray(image.convert("RGB").resize((SIZE, SIZE), Image.BILINEAR), dtype=np.float32) / 255.0
    ring = np.concatenate(
        [
            pixels[:3].reshape(-1, 3),
            pixels[-3:].reshape(-1, 3),
            pixels[3:-3, :3].reshape(-1, 3),
            pixels[3:-3, -3:].reshape(-1, 3),
        ]
    )
    strips = [pixels[4:8, 4:60], pixels[8:30, 4:7], pixels[8:30, 57:60]]
    return [float(v) for v in np.concatenate([ring.mean(0), *[np.median(p.reshape(-1, 3), 0) for p in strips]])]


@dataclass(frozen=True)
class SceneReader:
    """Reads where a picture is (SCENES) and how it is made (STYLES) by the nearest class centre of
    :func:`_scene_features`, the centres measured on renders (:func:`fit_scene_reader`)."""

    scene_centres: dict[str, tuple[float, ...]]
    style_centres: dict[str, tuple[float, ...]]
    scale: tuple[float, ...]  # each feature's spread over the renders: distances are measured in it

    def read(self, images: list[Image.Image]) -> list[tuple[str, str]]:
        """(scene, style) of each picture: the style from the ring's colour; the place from the strips', each
        place's distance summed over its two nearest strips (long hair or a large head may cover one)."""

        def distance(features: list[float], centre: tuple[float, ...], part: slice) -> float:
            return sum(
                ((f - c) / s) ** 2 for f, c, s in zip(features[part], centre[part], self.scale[part], strict=True)
            )

        def place(features: list[float], label: str) -> float:
            strips = sorted(distance(features, self.scene_centres[label], slice(i, i + 3)) for i in (3, 6, 9))
            return strips[0] + strips[1]

        read = []
        for image in images:
            features = _scene_features(image)
            read.append(
                (
                    min(SCENES, key=lambda label: place(features, label)),
                    min(STYLES, key=lambda label: distance(features, self.style_centres[label], slice(0, 3))),
                )
            )
        return read


def fit_scene_reader(count: int = 400, seed: int = 11) -> SceneReader:
    """The scene reader's class centres, from `count` renders of random people in random scenes."""
    import numpy as np

    rng = random.Random(seed)
    drawn = [(random_person(rng, allow_held_out=True), random_scene(rng)) for _ in range(count)]
    features = np.array([_scene_features(render(person, scene)) for person, scene in drawn])
    scale = tuple(float(v) for v in np.maximum(features.std(0), 1e-3))

    def centres(labels: list[str], values: tuple[str, ...]) -> dict[str, tuple[float, ...]]:
        return {
            value: tuple(float(v) for v in features[[label == value for label in labels]].mean(0)) for value in values
        }

    return SceneReader(
        scene_centres=centres([scene.scene for _, scene in drawn], SCENES),
        style_centres=centres([scene.style for _, scene in drawn], STYLES),
        scale=scale,
    )


def prompt_scene(prompt: str) -> tuple[str, str]:
    """The place and style a world prompt asks for (caption()'s words)."""
    style = "painting" if prompt.startswith("a painting") else "photo"
    for scene, words in (("beach", "on a beach"), ("forest", "in a forest"), ("night", "at night")):
        if words in prompt:
            return scene, style
    return "plain", style

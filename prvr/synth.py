"""A synthetic PRVR collection in exactly the public release layout.

The world is compositional: an event is (who, does what, with what, where), each
attribute drawn from a small vocabulary with synonyms. A video is a sequence of
events separated by background frames; each query paraphrases ONE event (its
moment). Frame features are a fixed random non-linear map of the event's
attribute embeddings, plus a per-video style vector and noise. Videos share
attributes (a recurring main character and place, mutated copies of other
videos' events), so a match needs the whole combination; most moments are
short, so whole-video mean pooling dilutes them while clip-level matching
recovers them.

Usage::

    path = synthesize("data", "synth", preset="tiny", seed=2018)
"""
from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from prvr.collection import SPLITS, caption_file_name
from prvr.errors import DataError

__all__ = ["Preset", "PRESETS", "synthesize"]


@dataclass(frozen=True)
class Preset:
    videos: dict[str, int]          # videos per split
    video_dim: int
    frames: tuple[int, int, int]    # min, median, max frames per video
    queries: tuple[int, int]        # queries per video, inclusive range
    feature: str                    # FeatureData/<feature>
    noise_std: float = 0.6          # per-frame feature noise
    share: tuple[float, float] = (0.6, 0.7)   # chance an event keeps the main character / place
    distractors: int = 1            # tries per video at a one-attribute copy of an earlier event
    mutate: float = 0.5             # chance of each try
    moments: tuple[float, float, float] = (0.6, 0.28, 0.12)  # short / medium / long event mix
    short: tuple[float, float] = (0.03, 0.2)  # a short event's share of its video


PRESETS: dict[str, Preset] = {
    "tiny": Preset({"train": 80, "val": 20, "test": 30}, 64, (20, 50, 120), (3, 5), "synth_feat"),
    "small": Preset({"train": 800, "val": 150, "test": 300}, 512, (20, 60, 200), (3, 5), "synth_feat"),
    "tvr-like": Preset({"train": 5000, "val": 500, "test": 1000}, 3072, (20, 50, 160), (5, 5), "i3d_resnet"),
    # Where the variants separate: longer videos whose moments are mostly very short, noisier
    # frames, and several distractor events per video that share actor, action or place
    # with an earlier video's event (only one attribute differs).
    "hard": Preset({"train": 600, "val": 150, "test": 300}, 512, (40, 120, 300), (3, 5), "synth_feat",
                   noise_std=1.0, share=(0.8, 0.85), distractors=3, mutate=0.8,
                   moments=(0.8, 0.15, 0.05), short=(0.02, 0.1)),
}

# Each attribute value: a list of synonyms. Actions are (3rd person, -ing) pairs.
WHO = [
    ["woman", "lady", "young woman"], ["man", "guy", "gentleman"], ["boy", "kid", "little boy"],
    ["girl", "little girl", "young girl"], ["old man", "elderly man", "grandpa"],
    ["old woman", "elderly lady", "grandma"], ["doctor", "physician", "medic"],
    ["police officer", "cop", "policeman"], ["chef", "cook"], ["nurse", "hospital nurse"],
    ["waiter", "server"], ["student", "college student", "pupil"],
    ["woman in a red coat", "lady wearing a red coat"], ["man in a blue suit", "guy wearing a blue suit"],
]
ACTIONS = [
    [("opens", "opening")], [("closes", "closing"), ("shuts", "shutting")],
    [("picks up", "picking up"), ("grabs", "grabbing"), ("takes", "taking")],
    [("puts down", "putting down"), ("sets down", "setting down"), ("places", "placing")],
    [("holds", "holding")], [("throws", "throwing"), ("tosses", "tossing")],
    [("looks at", "looking at"), ("stares at", "staring at"), ("examines", "examining")],
    [("cleans", "cleaning"), ("wipes", "wiping")], [("carries", "carrying")], [("drops", "dropping")],
    [("pushes", "pushing"), ("shoves", "shoving")], [("points at", "pointing at")],
    [("hands over", "handing over"), ("gives away", "giving away")], [("shakes", "shaking")],
    [("hides", "hiding")],
]
OBJECTS = [
    ["cup", "mug"], ["book", "novel"], ["phone", "cellphone", "smartphone"], ["bag", "backpack"],
    ["box", "package", "parcel"], ["bottle", "flask"], ["laptop", "computer"], ["ball"], ["umbrella"],
    ["guitar"], ["knife", "blade"], ["letter", "envelope"], ["key", "door key"], ["plate", "dish"],
]
PLACES = [
    ["in the kitchen", "inside the kitchen"], ["in the office", "at the office", "at work"],
    ["in the park", "at the park"], ["in a hospital room", "at the hospital"],
    ["in the living room", "in the lounge"], ["on the street", "outside on the sidewalk"],
    ["in the classroom", "at school"], ["in a restaurant", "at the diner"], ["in the bedroom"],
    ["in the car", "inside a car"], ["on the beach", "by the sea"], ["at the bar", "in a pub"],
]
VOCAB = (WHO, ACTIONS, OBJECTS, PLACES)
TEMPLATES = [
    "{a_who} {act} {the_obj} {place}",
    "{place}, {the_who} {act} {a_obj}",
    "{a_who} {place} {act} {the_obj}",
    "{a_who} is {ing} {a_obj} {place}",
    "we see {a_who} {ing} {the_obj} {place}",
    "{the_who} who is {place} {act} {a_obj}",
    "{place} {a_who} {act} {the_obj}",
    "{the_who} {act} {a_obj} while {ing_place}",
]

LATENT = 16           # embedding size per attribute; an event code is 4 x LATENT
HIDDEN = 256          # the feature map's hidden width
FRAME_JITTER = 0.35   # per-frame variation of the latent code within an event
STYLE_STD = 0.5       # per-video offset (camera, lighting), same for all its frames
FRAME_BATCH = 8192    # frames mapped per matmul
FRAME_SECONDS = 1.5   # each feature vector stands for 1.5 s of video (as in the TVR release)


def _article(noun: str, definite: bool) -> str:
    if definite:
        return f"the {noun}"
    return f"{'an' if noun[0] in 'aeiou' else 'a'} {noun}"


def _sentence(event: tuple[int, int, int, int], rng: np.random.Generator) -> str:
    """One paraphrase of an event: a random template with random synonyms."""
    who = rng.choice(WHO[event[0]])
    act, ing = ACTIONS[event[1]][rng.integers(len(ACTIONS[event[1]]))]
    obj = rng.choice(OBJECTS[event[2]])
    place = rng.choice(PLACES[event[3]])
    text = TEMPLATES[rng.integers(len(TEMPLATES))].format(
        a_who=_article(who, False), the_who=_article(who, True), act=act, ing=ing,
        a_obj=_article(obj, False), the_obj=_article(obj, True), place=place,
        ing_place=f"{'staying' if place.startswith(('in', 'at')) else 'being'} {place}")
    return text[0].upper() + text[1:] + "."


def _layout(num_frames: int, num_events: int, preset: Preset,
            rng: np.random.Generator) -> list[tuple[int, int]]:
    """[start, end) frames of each event: TVR-like spread, mostly short (M/V < 0.2), some long."""
    kind = rng.choice(3, size=num_events, p=list(preset.moments))
    frac = np.where(kind == 0, rng.uniform(*preset.short, num_events),
                    np.where(kind == 1, rng.uniform(0.2, 0.5, num_events), rng.uniform(0.5, 0.9, num_events)))
    if frac.sum() > 0.9:
        frac *= 0.9 / frac.sum()
    lengths = np.maximum(2, np.floor(frac * num_frames)).astype(int)
    while lengths.sum() > num_frames - 1:      # tiny videos: shrink the longest event
        lengths[lengths.argmax()] -= 1
    gaps = rng.dirichlet(np.ones(num_events + 1)) * (num_frames - lengths.sum())
    gap_frames = np.floor(gaps).astype(int)
    gap_frames[-1] += num_frames - lengths.sum() - gap_frames.sum()
    spans, t = [], 0
    for gap, length in zip(gap_frames[:-1], lengths):
        t += int(gap)
        spans.append((t, t + int(length)))
        t += int(length)
    return spans


class _World:
    """Fixed random attribute embeddings and feature map for one seed."""

    def __init__(self, rng: np.random.Generator, video_dim: int, noise_std: float):
        self.noise_std = noise_std
        self.embed = [rng.standard_normal((len(v), LATENT)).astype(np.float32) for v in VOCAB]
        width = LATENT * len(VOCAB)
        self.w1 = (rng.standard_normal((width, HIDDEN)) * 1.5 / np.sqrt(width)).astype(np.float32)
        self.b1 = (rng.standard_normal(HIDDEN) * 0.3).astype(np.float32)
        self.w2 = (rng.standard_normal((HIDDEN, video_dim)) / np.sqrt(HIDDEN)).astype(np.float32)
        self.background = rng.standard_normal(width).astype(np.float32)

    def code(self, event: tuple[int, int, int, int]) -> np.ndarray:
        return np.concatenate([e[i] for e, i in zip(self.embed, event)])

    def frames(self, codes: list[np.ndarray], rng: np.random.Generator) -> np.ndarray:
        """Latent codes (T_i, 4*LATENT) of several videos -> their stacked (sum T_i, video_dim)
        features, each video with its own style offset, every frame with noise.

        Videos are mapped in batches: one matmul per batch, not per video.
        """
        z = np.concatenate(codes)
        z += FRAME_JITTER * rng.standard_normal(z.shape, dtype=np.float32)
        feats = np.tanh(z @ self.w1 + self.b1) @ self.w2
        style = STYLE_STD * rng.standard_normal((len(codes), self.w2.shape[1]), dtype=np.float32)
        feats += np.repeat(style, [len(c) for c in codes], axis=0)
        feats += self.noise_std * rng.standard_normal(feats.shape, dtype=np.float32)
        return feats.astype("<f4")


def _random_event(rng: np.random.Generator, who: int, place: int,
                  share: tuple[float, float]) -> tuple[int, int, int, int]:
    return (who if rng.random() < share[0] else int(rng.integers(len(WHO))),
            int(rng.integers(len(ACTIONS))), int(rng.integers(len(OBJECTS))),
            place if rng.random() < share[1] else int(rng.integers(len(PLACES))))


def _video_length(preset: Preset, rng: np.random.Generator) -> int:
    lo, median, hi = preset.frames
    return int(np.clip(round(median * np.exp(0.5 * rng.standard_normal())), lo, hi))


def _video(preset: Preset, world: _World, past_events: list[tuple[int, int, int, int]],
           rng: np.random.Generator) -> tuple[int, list[tuple[int, int, int, int]], list[tuple[int, int]],
                                              np.ndarray, str]:
    """One video: its length, events, their [start, end) frames, per-frame latent codes and a
    title naming its main character and place."""
    num_frames = _video_length(preset, rng)
    num_events = int(rng.integers(2, 6))
    who, place = int(rng.integers(len(WHO))), int(rng.integers(len(PLACES)))
    events = [_random_event(rng, who, place, preset.share) for _ in range(num_events)]
    for _ in range(preset.distractors):
        if past_events and rng.random() < preset.mutate:   # a hard distractor for an earlier video
            copy = list(past_events[rng.integers(len(past_events))])
            slot = int(rng.integers(4))
            copy[slot] = (copy[slot] + 1 + int(rng.integers(len(VOCAB[slot]) - 1))) % len(VOCAB[slot])
            events[int(rng.integers(num_events))] = tuple(copy)
    past_events.extend(events)
    spans = _layout(num_frames, num_events, preset, rng)
    background = world.background + 0.7 * rng.standard_normal(world.background.shape, dtype=np.float32)
    codes = np.repeat(background[None], num_frames, axis=0)
    for event, (s, e) in zip(events, spans):
        codes[s:e] = world.code(event)
    title = f"{_article(WHO[who][0], False)} {PLACES[place][0]}"
    return num_frames, events, spans, codes, title[0].upper() + title[1:]


def _write_collection(folder: Path, collection: str, preset_name: str, seed: int) -> None:
    preset = PRESETS[preset_name]
    rng = np.random.default_rng(seed)
    world = _World(rng, preset.video_dim, preset.noise_std)
    feature_rng = np.random.default_rng([seed, 1])   # own stream: batching never shifts the layout's
    pending: list[np.ndarray] = []
    feat_dir = folder / "FeatureData" / preset.feature
    text_dir = folder / "TextData"
    feat_dir.mkdir(parents=True)
    text_dir.mkdir()
    ids: list[str] = []
    video2frames: dict[str, list[str]] = {}
    moments: list[dict[str, Any]] = []
    infos: list[dict[str, Any]] = []
    past_events: list[tuple[int, int, int, int]] = []
    index = 0
    with open(feat_dir / "feature.bin", "wb") as bin_file:
        for split in SPLITS:
            lines = []
            for _ in range(preset.videos[split]):
                video_id = f"video{index:06d}"
                index += 1
                num_frames, events, spans, codes, title = _video(preset, world, past_events, rng)
                infos.append({"video_id": video_id, "title": title,
                              "duration_s": round(num_frames * FRAME_SECONDS, 3)})
                pending.append(codes)
                if sum(len(c) for c in pending) >= FRAME_BATCH:
                    bin_file.write(world.frames(pending, feature_rng).tobytes())
                    pending = []
                frames = [f"{video_id}_{t}" for t in range(num_frames)]
                ids.extend(frames)
                video2frames[video_id] = frames
                num_queries = int(rng.integers(preset.queries[0], preset.queries[1] + 1))
                order = rng.permutation(len(events))
                for k in range(num_queries):
                    which = int(order[k]) if k < len(events) else int(rng.integers(len(events)))
                    cap_id = f"{video_id}#enc#{k}"
                    lines.append(f"{cap_id} {_sentence(events[which], rng)}\n")
                    s, e = spans[which]
                    moments.append({"cap_id": cap_id, "start": s, "end": e, "num_frames": num_frames})
            (text_dir / caption_file_name(collection, split)).write_text("".join(lines))
        if pending:
            bin_file.write(world.frames(pending, feature_rng).tobytes())
    (feat_dir / "id.txt").write_text(" ".join(ids) + "\n")
    (feat_dir / "shape.txt").write_text(f"{len(ids)} {preset.video_dim}\n")
    (feat_dir / "video2frames.txt").write_text(repr(video2frames) + "\n")
    (folder / "moments.jsonl").write_text("".join(json.dumps(m) + "\n" for m in moments))
    (folder / "videos.jsonl").write_text("".join(json.dumps(i) + "\n" for i in infos))
    (folder / "synth.json").write_text(json.dumps({"generator": "prvr.synth", "preset": preset_name,
                                                   "seed": seed}) + "\n")


def synthesize(out_root: str | Path, collection: str, preset: str = "tiny", seed: int = 2018) -> Path:
    """Write ``out_root/collection`` (captions, BigFile, moments.jsonl) and return its path.

    The folder is built aside and swapped in whole, so a stale text-feature HDF5 from
    an earlier run never survives next to new captions. A folder that synth did not
    write is never replaced.
    """
    if preset not in PRESETS:
        raise DataError(f"unknown synth preset {preset!r}; choose from {sorted(PRESETS)}")
    out_root = Path(out_root)
    target = out_root / collection
    if target.exists() and not (target / "synth.json").is_file():
        raise DataError(f"{target} exists and was not written by `prvr synth`; refusing to replace it")
    tmp = out_root / f".{collection}.tmp-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    try:
        _write_collection(tmp, collection, preset, seed)
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    return target

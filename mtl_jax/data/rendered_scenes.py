"""Rendered indoor scenes: a dense multi-task dataset (13-class semantics, depth, surface normals) that
trains on a CPU, generated here by ray casting (numpy, no network).

NYUv2 (Silberman et al. 2012, in MTAN's 288x384 preprocessing) is the benchmark this stands in for:
its three tasks come from one geometry here, so they are exactly consistent with each other.

Scene (one per example; every random choice drawn from ``np.random.default_rng([seed, split, index])``,
so example ``index`` of a split is a pure function of ``(seed, split, index)``):

* World frame: y up, metres. A room ``[0, Lx] x [0, Ly] x [0, Lz]`` (``Lx, Lz`` in [3.5, 7], height ``Ly``
  in [2.4, 3.2]): floor (y = 0), ceiling (y = Ly), four walls. Wall decals (windows, pictures) and a rug
  are rectangles in those planes: same geometry as the plane, their own class and appearance.
* 3 to 8 objects standing on the floor, footprints not overlapping, most of them in front of the camera:
  furniture built from yawed boxes (bed = base + pillow; table = top + 4 legs; chair = seat + back + 4
  legs; cabinet; sofa = base + back + 2 arms), balls (spheres on the floor; a quarter of them float
  0.2-1 m above it) and cylinders (vertical: bins, stools, pillars).
* Pinhole camera inside the room, at least 0.5 m from the walls and 0.35 m from any object's footprint,
  1.0-1.8 m high, yaw within 50 degrees of the direction to the room's centre, pitch -30..0 degrees
  (roughly horizontal or down), roll -4..+4 degrees, horizontal field of view 55-70 degrees (NYUv2's
  Kinect: about 58), principal point at the image centre.
* Lighting: ambient + one point light near the ceiling + a second light in 3 of 5 scenes (a point light,
  or a directional one), Lambertian, with shadows cast by the objects (shadow rays); windows glow.
  Albedo: a colour per object / wall, each with a procedural solid texture (plain, stripes, checks or
  a wavy grain) in two colours drawn from the same palette for every class, so colour alone
  does not tell the class. Gamma 2.2, 8-bit quantised like a photograph.

Records (``dense_interface.md``): ``image`` float32 [H, W, 3] in [0, 1]; ``segmentation`` int64 [H, W] in
[0, 13) (every pixel sees a surface: no ignore label); ``depth`` float32 [H, W, 1]: z-depth in metres
(distance along the optical axis, as a depth camera measures), > 0 everywhere; ``normal`` float32
[H, W, 3]: unit surface normals in the camera frame, x right, y up, z towards the viewer (the camera
looks along -z, OpenGL's camera frame), so a visible surface has ``normal . ray < 0`` and a floor seen
from a level camera is (0, 1, 0). The files store the image as uint8 and the labels as int8
(``load_rendered_scenes`` decodes them).

Classes (``CLASSES``): 0 floor, 1 wall, 2 ceiling, 3 window, 4 picture, 5 rug, 6 bed, 7 table, 8 chair,
9 cabinet, 10 sofa, 11 ball, 12 cylinder. Pixel shares (%) over 200 train scenes of seed 0: wall 41,
floor 18, cabinet 11, rug 4.6, window 4.3, bed 3.8, table 3.8, sofa 3.6, cylinder 3.4, chair 2.2,
ceiling 1.9, ball 1.7, picture 0.9 (``class_frequencies``); each class is in 18-100% of the images.
"""

from __future__ import annotations

import dataclasses
from typing import Mapping

import numpy as np

from mtl_jax.config import Rule

CLASSES = ("floor", "wall", "ceiling", "window", "picture", "rug", "bed", "table", "chair", "cabinet", "sofa",
           "ball", "cylinder")
FLOOR, WALL, CEILING, WINDOW, PICTURE, RUG, BED, TABLE, CHAIR, CABINET, SOFA, BALL, CYLINDER = range(len(CLASSES))
SPLITS = ("train", "test")
# Textures (solid: a function of the point in the object's own frame, so they wrap any primitive).
PLAIN, STRIPES, CHECKS, GRAIN = range(4)
EPS = 1e-6

# The ``config.data`` keys of this dataset (``--config.data.<key>=...`` when ``data.name`` is
# 'rendered_scenes'), with their defaults: image height / width in pixels (SegNet needs multiples of 32;
# 64 x 96 is NYUv2's 288 x 384 at 2/9 scale, a 2:3 instead of 3:4 frame); and their rules. The common keys
# ``num_train`` / ``num_test`` / ``seed`` set the split sizes and the scene seed.
OPTIONS = dict(height=64, width=96)
RULES = {"height": Rule("int", 8), "width": Rule("int", 8)}
# Split sizes the configs use: about a minute of rendering on one CPU core (~11 ms per 64 x 96 image).
NUM_TRAIN, NUM_TEST = 5000, 1000


# --------------------------------------------------------------------------------------------- scene


@dataclasses.dataclass(frozen=True)
class Scene:
    """Everything a render needs, as numpy arrays (world frame, y up, metres).

    room: [3] (Lx, Ly, Lz). camera: [3] position; rotation: [3, 3] camera-to-world (columns: right, up,
    backward); focal: horizontal focal length over image width (pixels = focal * width).
    boxes: centre [B, 3], half sizes [B, 3], yaw [B], class [B], object id [B].
    spheres: centre [S, 3], radius [S], class, object id. cylinders: base centre [C, 3] (y = 0),
    radius [C], height [C], class, object id.
    decals: [D, 6] rows (plane, u0, u1, v0, v1, class): plane 0..3 the walls x=0, x=Lx, z=0, z=Lz (u along
    the wall, v = height), 4 the floor (u = x, v = z); the object id of decal d is ``FIRST_DECAL_ID + d``.
    appearance: per object id [K, 9]: colour a (3), colour b (3), texture, scale, emission.
    lights: [L, 7] rows (kind 0 point / 1 directional, x, y, z (position or direction to the light),
    intensity, unused, unused); ambient: scalar.
    """

    room: np.ndarray
    camera: np.ndarray
    rotation: np.ndarray
    focal: float
    box_centre: np.ndarray
    box_half: np.ndarray
    box_yaw: np.ndarray
    box_class: np.ndarray
    box_id: np.ndarray
    sphere_centre: np.ndarray
    sphere_radius: np.ndarray
    sphere_class: np.ndarray
    sphere_id: np.ndarray
    cyl_base: np.ndarray
    cyl_radius: np.ndarray
    cyl_height: np.ndarray
    cyl_class: np.ndarray
    cyl_id: np.ndarray
    decals: np.ndarray
    appearance: np.ndarray
    lights: np.ndarray
    ambient: float


# Object ids: 0..5 the room's planes (floor, ceiling, walls x=0, x=Lx, z=0, z=Lz), then the objects, then decals.
ROOM_IDS = 6
MAX_OBJECTS = 8
FIRST_DECAL_ID = ROOM_IDS + MAX_OBJECTS


def _palette_colour(rng: np.random.Generator, light: bool = False) -> np.ndarray:
    """An RGB albedo in [0, 1]: a random hue, saturation and value (lighter for walls / ceilings)."""
    h, s = rng.uniform(0, 1), rng.uniform(0.05, 0.7)
    v = rng.uniform(0.55, 0.95) if light else rng.uniform(0.15, 0.95)
    k = (np.array([5.0, 3.0, 1.0]) + h * 6) % 6
    return v - v * s * np.clip(np.minimum(k, 4 - k), 0, 1)


def _appearance(rng: np.random.Generator, light: bool = False, emission: float = 0.0) -> np.ndarray:
    """[9]: colour a, colour b (a variation of a), texture kind, texture scale (metres), emission. Light
    (wall / ceiling) surfaces are more often plain."""
    a = _palette_colour(rng, light)
    b = np.clip(a * rng.uniform(0.4, 1.3) + rng.normal(0, 0.12, 3), 0, 1)
    texture = rng.choice(4, p=[0.55, 0.2, 0.1, 0.15] if light else [0.3, 0.3, 0.25, 0.15])
    return np.concatenate([a, b, [texture, rng.uniform(0.08, 0.5), emission]])


def _camera(rng: np.random.Generator, room: np.ndarray):
    """Position, camera-to-world rotation (columns right, up, backward), focal / width."""
    position = np.array([rng.uniform(0.5, room[0] - 0.5), rng.uniform(1.0, min(1.8, room[1] - 0.3)),
                         rng.uniform(0.5, room[2] - 0.5)])
    to_centre = np.arctan2(room[0] / 2 - position[0], room[2] / 2 - position[2])
    yaw = to_centre + np.radians(rng.uniform(-50, 50))
    pitch, roll = np.radians(rng.uniform(-30, 0)), np.radians(rng.uniform(-4, 4))
    forward = np.array([np.cos(pitch) * np.sin(yaw), np.sin(pitch), np.cos(pitch) * np.cos(yaw)])
    right = np.cross(forward, [0.0, 1.0, 0.0])
    right /= np.linalg.norm(right)
    up = np.cross(right, forward)
    right, up = np.cos(roll) * right + np.sin(roll) * up, -np.sin(roll) * right + np.cos(roll) * up
    fov = np.radians(rng.uniform(55, 70))
    return position, np.stack([right, up, -forward], axis=1), 0.5 / np.tan(fov / 2), yaw


def _furniture(kind: int, rng: np.random.Generator):
    """Boxes of one piece of furniture in its own frame (footprint centred at the origin, y up from the
    floor): (centres [n, 3], half sizes [n, 3]), and its footprint radius."""
    def box(x0, x1, y0, y1, z0, z1):
        return [(x0 + x1) / 2, (y0 + y1) / 2, (z0 + z1) / 2], [(x1 - x0) / 2, (y1 - y0) / 2, (z1 - z0) / 2]

    if kind == BED:
        w, d, h = rng.uniform(0.9, 1.8), rng.uniform(1.9, 2.1), rng.uniform(0.35, 0.6)
        parts = [box(-w / 2, w / 2, 0, h, -d / 2, d / 2),
                 box(-w / 2 + 0.1, w / 2 - 0.1, h, h + 0.12, d / 2 - 0.5, d / 2 - 0.1)]
    elif kind == TABLE:
        w, d, h, leg = rng.uniform(0.8, 1.8), rng.uniform(0.6, 1.0), rng.uniform(0.65, 0.78), rng.uniform(0.04, 0.08)
        parts = [box(-w / 2, w / 2, h - 0.05, h, -d / 2, d / 2)]
        parts += [box(sx * (w / 2 - 0.05) - leg / 2, sx * (w / 2 - 0.05) + leg / 2, 0, h - 0.05,
                      sz * (d / 2 - 0.05) - leg / 2, sz * (d / 2 - 0.05) + leg / 2) for sx in (-1, 1) for sz in (-1, 1)]
    elif kind == CHAIR:
        w, h, leg = rng.uniform(0.4, 0.5), rng.uniform(0.42, 0.48), 0.04
        parts = [box(-w / 2, w / 2, h - 0.05, h, -w / 2, w / 2),
                 box(-w / 2, w / 2, h, h + rng.uniform(0.35, 0.5), w / 2 - 0.05, w / 2)]
        parts += [box(sx * (w / 2 - 0.03) - leg / 2, sx * (w / 2 - 0.03) + leg / 2, 0, h - 0.05,
                      sz * (w / 2 - 0.03) - leg / 2, sz * (w / 2 - 0.03) + leg / 2) for sx in (-1, 1) for sz in (-1, 1)]
    elif kind == CABINET:
        w, d, h = rng.uniform(0.5, 1.4), rng.uniform(0.35, 0.6), rng.uniform(0.9, 2.0)
        parts = [box(-w / 2, w / 2, 0, h, -d / 2, d / 2)]
    else:  # SOFA
        w, d, h, arm = rng.uniform(1.4, 2.2), rng.uniform(0.8, 0.95), rng.uniform(0.4, 0.48), 0.18
        parts = [box(-w / 2, w / 2, 0, h, -d / 2, d / 2), box(-w / 2, w / 2, h, h + 0.4, d / 2 - 0.2, d / 2),
                 box(-w / 2, -w / 2 + arm, h, h + 0.2, -d / 2, d / 2 - 0.2),
                 box(w / 2 - arm, w / 2, h, h + 0.2, -d / 2, d / 2 - 0.2)]
    centres, halves = (np.array(v, float) for v in zip(*parts))
    return centres, halves, float(np.hypot(w, d if kind != CHAIR else w) / 2)


def make_scene(seed: int, index: int, split: str = "train") -> Scene:
    """The scene of example ``index`` of ``split`` (a pure function of ``(seed, split, index)``)."""
    rng = np.random.default_rng([seed, SPLITS.index(split), index])
    room = np.array([rng.uniform(3.5, 7), rng.uniform(2.4, 3.2), rng.uniform(3.5, 7)])
    camera, rotation, focal, yaw = _camera(rng, room)
    appearance = np.zeros((FIRST_DECAL_ID + 8 + 1, 9))
    floor = _appearance(rng)
    appearance[0] = floor
    appearance[1] = _appearance(rng, light=True)
    wall = _appearance(rng, light=True)
    for k in range(4):  # walls share a colour, most of the time
        appearance[2 + k] = wall if rng.uniform() < 0.75 else _appearance(rng, light=True)

    boxes, spheres, cylinders = [], [], []
    placed = [(camera[0], camera[2], 0.3)]  # footprints (x, z, radius) to keep apart
    kinds = rng.choice([BED, TABLE, CHAIR, CABINET, SOFA, BALL, CYLINDER], size=rng.integers(3, MAX_OBJECTS + 1),
                       p=[0.1, 0.16, 0.2, 0.14, 0.1, 0.15, 0.15])
    for slot, kind in enumerate(kinds):
        object_id = ROOM_IDS + slot
        if kind == BALL:
            radius = rng.uniform(0.12, 0.45)
            parts, footprint = None, radius
        elif kind == CYLINDER:
            radius, height = rng.uniform(0.12, 0.4), rng.uniform(0.3, 1.6)
            parts, footprint = None, radius
        else:
            parts = _furniture(int(kind), rng)
            footprint = parts[2]
        for _ in range(30):  # rejection sampling of a free spot, biased to the camera's view
            if rng.uniform() < 0.75:
                angle, dist = yaw + rng.uniform(-0.6, 0.6), rng.uniform(1.0, 5.0)
                x, z = camera[0] + dist * np.sin(angle), camera[2] + dist * np.cos(angle)
            else:
                x, z = rng.uniform(0, room[0]), rng.uniform(0, room[2])
            margin = footprint + 0.02
            inside = margin <= x <= room[0] - margin and margin <= z <= room[2] - margin
            if inside and all(np.hypot(x - px, z - pz) > footprint + pr + 0.05 for px, pz, pr in placed):
                break
        else:
            continue
        placed.append((x, z, footprint))
        appearance[object_id] = _appearance(rng)
        if kind == BALL:
            lift = rng.uniform(0.2, 1.0) if rng.uniform() < 0.25 else 0.0
            spheres.append(([x, radius + lift, z], radius, kind, object_id))
        elif kind == CYLINDER:
            cylinders.append(([x, 0.0, z], radius, height, kind, object_id))
        else:
            centres, halves, _ = parts
            turn = rng.choice([0, 0.5, 1, 1.5]) * np.pi + rng.uniform(-0.2, 0.2)
            c, s = np.cos(turn), np.sin(turn)
            for centre, half in zip(centres, halves):
                world = [x + c * centre[0] + s * centre[2], centre[1], z - s * centre[0] + c * centre[2]]
                boxes.append((world, half, turn, kind, object_id))

    decals = []
    for wall_index in range(4):
        length = room[2] if wall_index < 2 else room[0]
        u = rng.uniform(0.2, 0.6)
        while u < length - 0.6 and len(decals) < 8:
            kind = rng.choice([WINDOW, PICTURE, -1], p=[0.3, 0.35, 0.35])
            w = rng.uniform(0.8, 1.6) if kind == WINDOW else rng.uniform(0.35, 1.0)
            if kind >= 0 and u + w < length - 0.2:
                v0, v1 = ((rng.uniform(0.7, 1.0), rng.uniform(1.9, min(2.3, room[1] - 0.2))) if kind == WINDOW
                          else sorted(rng.uniform(1.1, min(2.1, room[1] - 0.2), 2) + [-0.15, 0.15]))
                decals.append([wall_index, u, u + w, v0, v1, kind])
                emission = rng.uniform(0.6, 1.0) if kind == WINDOW else 0.0
                sky = np.array([0.75, 0.85, 1.0]) * rng.uniform(0.8, 1.0)
                look = _appearance(rng, emission=emission)
                if kind == WINDOW:
                    look[:3], look[3:6] = sky, rng.uniform(0.2, 0.9) * np.ones(3)
                appearance[FIRST_DECAL_ID + len(decals) - 1] = look
            u += w + rng.uniform(0.2, 1.5)
    if rng.uniform() < 0.6 and len(decals) < 9:
        w, d = rng.uniform(1.0, min(2.5, room[0] - 0.4)), rng.uniform(1.0, min(2.0, room[2] - 0.4))
        x = np.clip(camera[0] + 2.2 * np.sin(yaw) + rng.uniform(-1, 1), w / 2 + 0.1, room[0] - w / 2 - 0.1)
        z = np.clip(camera[2] + 2.2 * np.cos(yaw) + rng.uniform(-1, 1), d / 2 + 0.1, room[2] - d / 2 - 0.1)
        decals.append([4, x - w / 2, x + w / 2, z - d / 2, z + d / 2, RUG])
        appearance[FIRST_DECAL_ID + len(decals) - 1] = _appearance(rng)

    lights = [[0, rng.uniform(0.3, room[0] - 0.3), room[1] - rng.uniform(0.1, 0.4), rng.uniform(0.3, room[2] - 0.3),
               rng.uniform(2.0, 5.0), 0, 0]]
    if rng.uniform() < 0.6:
        if rng.uniform() < 0.5:
            lights.append([0, rng.uniform(0.3, room[0] - 0.3), rng.uniform(1.5, room[1] - 0.1),
                           rng.uniform(0.3, room[2] - 0.3), rng.uniform(1.0, 3.0), 0, 0])
        else:
            direction = np.array([rng.normal(), rng.uniform(0.3, 1.0), rng.normal()])
            lights.append([1, *(direction / np.linalg.norm(direction)), rng.uniform(0.2, 0.6), 0, 0])

    def columns(items, sizes):
        return [np.array([item[k] for item in items], float).reshape((len(items),) + size)
                for k, size in enumerate(sizes)]

    bc, bh, by, bk, bi = columns(boxes, [(3,), (3,), (), (), ()])
    sc, sr, sk, si = columns(spheres, [(3,), (), (), ()])
    cb, cr, ch, ck, ci = columns(cylinders, [(3,), (), (), (), ()])
    return Scene(room=room, camera=camera, rotation=rotation, focal=focal,
                 box_centre=bc, box_half=bh, box_yaw=by, box_class=bk.astype(int), box_id=bi.astype(int),
                 sphere_centre=sc, sphere_radius=sr, sphere_class=sk.astype(int), sphere_id=si.astype(int),
                 cyl_base=cb, cyl_radius=cr, cyl_height=ch, cyl_class=ck.astype(int), cyl_id=ci.astype(int),
                 decals=np.array(decals, float).reshape(-1, 6), appearance=appearance,
                 lights=np.array(lights, float), ambient=float(rng.uniform(0.15, 0.35)))


# ------------------------------------------------------------------------------------ intersections


def _safe(d: np.ndarray) -> np.ndarray:
    """Directions with exact zeros nudged (slab tests divide by them)."""
    return np.where(np.abs(d) < 1e-12, 1e-12, d)


def _bounding_sphere_pairs(origin, direction, centre, radius):
    """(primitive, ray) index pairs whose ray ``origin + t direction``, t > 0, passes within ``radius``
    [P] of ``centre`` [P, 3] (origin [3] or [N, 3], direction [N, 3]): candidates for the exact test."""
    origin = np.broadcast_to(origin, direction.shape)
    a = (direction * direction).sum(-1)[:, None]  # [N, 1]
    b = (origin * direction).sum(-1)[:, None] - direction @ centre.T  # oc . d, [N, P]
    c = ((origin * origin).sum(-1)[:, None] - 2 * origin @ centre.T + (centre * centre).sum(-1)[None]
         - radius[None] ** 2)
    disc = b * b - a * c
    ray, primitive = np.nonzero((disc >= 0) & (-b + np.sqrt(np.maximum(disc, 0)) > 0))
    return primitive, ray


def _group_pairs(origin, direction, centre, half, group):
    """(box, ray) candidate pairs: the rays meeting the bounding sphere of a group of boxes (one piece of
    furniture: ``group`` [B] its id, boxes sorted by it), paired with each box of the group."""
    ids, first, count = np.unique(group, return_index=True, return_counts=True)
    member = group[:, None] == ids[None]  # [B, G]
    middle = (member.T @ centre) / count[:, None]  # [G, 3]
    reach = np.linalg.norm(centre - middle[np.searchsorted(ids, group)], axis=-1) + np.linalg.norm(half, axis=-1)
    radius = np.where(member, reach[:, None], 0).max(0)
    candidate, ray = _bounding_sphere_pairs(origin, direction, middle, radius)
    repeat = count[candidate]
    pair = np.repeat(np.arange(len(candidate)), repeat)
    offset = np.arange(len(pair)) - np.repeat(np.cumsum(repeat) - repeat, repeat)
    return first[candidate][pair] + offset, ray[pair]


def intersect_boxes(origin, direction, centre, half, yaw, group=None):
    """Ray parameter of the first hit (inf: none) [B, N] and the hit face's axis (0..2) [B, N] of boxes
    rotated by ``yaw`` about the vertical through ``centre`` [B, 3], half sizes ``half`` [B, 3], for rays
    ``origin + t direction`` (origin [3] or [N, 3], direction [N, 3]); rays starting inside a box miss it.
    Slab test (Kay & Kajiya 1986) on the ray / box pairs that meet the bounding sphere of the box, or of
    its group (``group`` [B]: ids of the pieces of furniture, boxes sorted by it)."""
    t_out, face_out = np.full((len(centre), len(direction)), np.inf), np.zeros((len(centre), len(direction)), int)
    if not len(centre):
        return t_out, face_out
    if group is None:
        box, ray = _bounding_sphere_pairs(origin, direction, centre, np.linalg.norm(half, axis=-1))
    else:
        box, ray = _group_pairs(origin, direction, centre, half, group)
    rel = np.broadcast_to(origin, direction.shape)[ray] - centre[box]  # [P, 3]
    dw = direction[ray]
    c, s = np.cos(yaw[box]), np.sin(yaw[box])
    o = (c * rel[:, 0] - s * rel[:, 2], rel[:, 1], s * rel[:, 0] + c * rel[:, 2])
    d = (c * dw[:, 0] - s * dw[:, 2], dw[:, 1], s * dw[:, 0] + c * dw[:, 2])
    near, far = [], []
    for k in range(3):
        inverse = 1.0 / _safe(d[k])
        t1, t2 = (-half[box, k] - o[k]) * inverse, (half[box, k] - o[k]) * inverse
        near.append(np.minimum(t1, t2))
        far.append(np.maximum(t1, t2))
    t_near = np.maximum(np.maximum(near[0], near[1]), near[2])
    t_far = np.minimum(np.minimum(far[0], far[1]), far[2])
    t_out[box, ray] = np.where((t_near <= t_far) & (t_near > EPS), t_near, np.inf)
    face_out[box, ray] = np.where(near[0] == t_near, 0, np.where(near[1] == t_near, 1, 2))
    return t_out, face_out


def box_normals(direction_local_sign, face, yaw):
    """World normals of box hits: ``direction_local_sign`` [N] the sign of the local ray component on
    the hit axis, ``face`` [N] the axis, ``yaw`` [N] -> [N, 3]."""
    local = np.zeros(face.shape + (3,))
    np.put_along_axis(local, face[:, None], -direction_local_sign[:, None], axis=1)
    c, s = np.cos(yaw), np.sin(yaw)
    return np.stack([c * local[:, 0] + s * local[:, 2], local[:, 1], -s * local[:, 0] + c * local[:, 2]], axis=-1)


def intersect_spheres(origin, direction, centre, radius):
    """First-hit ray parameter [S, N] (inf: none) of spheres; rays from inside do not hit."""
    if not len(centre):
        return np.full((0, len(direction)), np.inf)
    oc = np.atleast_2d(origin)[None] - centre[:, None, :]
    a = (direction * direction).sum(-1)[None]
    b = (oc * direction[None]).sum(-1)
    c = (oc * oc).sum(-1) - radius[:, None] ** 2
    disc = b * b - a * c
    t = (-b - np.sqrt(np.maximum(disc, 0))) / a
    return np.where((disc >= 0) & (t > EPS) & (c > 0), t, np.inf)


def intersect_cylinders(origin, direction, base, radius, height):
    """First-hit ray parameter [C, N] (inf: none) and whether the hit is the top cap [C, N] of vertical
    cylinders standing on ``base`` (the bottom cap, on the floor, is never seen from above it)."""
    n = len(direction)
    if not len(base):
        return np.full((0, n), np.inf), np.zeros((0, n), bool)
    o = np.atleast_2d(origin)[None] - base[:, None, :]  # [C, N|1, 3]
    dx, dy, dz = direction[None, :, 0], _safe(direction[None, :, 1]), direction[None, :, 2]
    a = dx * dx + dz * dz
    b = o[..., 0] * dx + o[..., 2] * dz
    c = o[..., 0] ** 2 + o[..., 2] ** 2 - radius[:, None] ** 2
    disc = b * b - a * c
    t_side = (-b - np.sqrt(np.maximum(disc, 0))) / np.maximum(a, 1e-12)
    y_side = o[..., 1] + t_side * dy
    side = (disc >= 0) & (c > 0) & (t_side > EPS) & (y_side >= 0) & (y_side <= height[:, None])
    t_cap = (height[:, None] - o[..., 1]) / dy
    cap_x, cap_z = o[..., 0] + t_cap * dx, o[..., 2] + t_cap * dz
    cap = (t_cap > EPS) & (cap_x ** 2 + cap_z ** 2 <= radius[:, None] ** 2) & (o[..., 1] > height[:, None])
    t = np.minimum(np.where(side, t_side, np.inf), np.where(cap, t_cap, np.inf))
    return t, cap & (t_cap <= np.where(side, t_side, np.inf))


def intersect_room(origin, direction, room):
    """Exit parameter [N] of rays from inside the room box and which plane they hit [N]: 0 floor,
    1 ceiling, 2 wall x=0, 3 wall x=Lx, 4 wall z=0, 5 wall z=Lz."""
    d = _safe(direction)
    bound = np.where(d > 0, room, 0.0)
    t = (bound - origin) / d  # [N, 3]
    axis = t.argmin(-1)
    positive = np.take_along_axis(d, axis[:, None], 1)[:, 0] > 0
    plane = np.choose(axis, [2 + positive, 0 + positive, 4 + positive])
    return t.min(-1), plane


PLANE_NORMALS = np.array([[0, 1, 0], [0, -1, 0], [1, 0, 0], [-1, 0, 0], [0, 0, 1], [0, 0, -1]], float)


def _occluded(points, to_light, scene: Scene, limit):
    """bool [N]: whether an object blocks the segment ``points + t to_light``, 0 < t < ``limit`` [N]."""
    tb, _ = intersect_boxes(points, to_light, scene.box_centre, scene.box_half, scene.box_yaw, scene.box_id)
    ts = intersect_spheres(points, to_light, scene.sphere_centre, scene.sphere_radius)
    tc, _ = intersect_cylinders(points, to_light, scene.cyl_base, scene.cyl_radius, scene.cyl_height)
    t = np.concatenate([tb, ts, tc], axis=0)
    return (t < limit[None]).any(0) if len(t) else np.zeros(len(points), bool)


# ------------------------------------------------------------------------------------------- render


def camera_rays(height: int, width: int, focal: float) -> np.ndarray:
    """[H * W, 3] camera-frame rays through the pixel centres, scaled to z = -1 (so a ray parameter is
    the z-depth): x right, y up, z towards the viewer; ``focal`` in units of the image width."""
    f = focal * width
    v, u = np.meshgrid(np.arange(height) + 0.5, np.arange(width) + 0.5, indexing="ij")
    return np.stack([(u - width / 2) / f, -(v - height / 2) / f, -np.ones_like(u)], axis=-1).reshape(-1, 3)


def render(scene: Scene, height: int, width: int) -> dict:
    """Ray casts ``scene``: {'image' float32 [H, W, 3] in [0, 1] (before quantisation), 'segmentation'
    int64 [H, W], 'depth' float32 [H, W, 1] (z-depth, m), 'normal' float32 [H, W, 3] (camera frame),
    'object' int64 [H, W] (object id), 'point' float64 [H, W, 3] (world hit point)}."""
    rays = camera_rays(height, width, scene.focal)
    d = rays @ scene.rotation.T  # world directions [N, 3]
    o = scene.camera
    n = len(d)
    t_room, plane = intersect_room(o[None], d, scene.room)
    t_box, face = intersect_boxes(o, d, scene.box_centre, scene.box_half, scene.box_yaw, scene.box_id)
    t_sph = intersect_spheres(o, d, scene.sphere_centre, scene.sphere_radius)
    t_cyl, cap = intersect_cylinders(o, d, scene.cyl_base, scene.cyl_radius, scene.cyl_height)
    all_t = np.concatenate([t_room[None], t_box, t_sph, t_cyl], axis=0)  # [1 + B + S + C, N]
    which = all_t.argmin(0)
    t = np.take_along_axis(all_t, which[None], 0)[0]
    point = o + t[:, None] * d
    nb, ns = len(t_box), len(t_sph)
    rows = np.arange(n)

    normal = PLANE_NORMALS[plane]
    object_id = plane.copy()
    label = np.where(plane == 0, FLOOR, np.where(plane == 1, CEILING, WALL))
    is_box = (which >= 1) & (which < 1 + nb)
    if is_box.any():
        k = which[is_box] - 1
        f = face[k, rows[is_box]]
        c, s = np.cos(scene.box_yaw[k]), np.sin(scene.box_yaw[k])
        local_d = np.stack([c * d[is_box, 0] - s * d[is_box, 2], d[is_box, 1], s * d[is_box, 0] + c * d[is_box, 2]], -1)
        sign = np.sign(np.take_along_axis(local_d, f[:, None], 1)[:, 0])
        normal[is_box] = box_normals(sign, f, scene.box_yaw[k])
        object_id[is_box], label[is_box] = scene.box_id[k], scene.box_class[k]
    is_sph = (which >= 1 + nb) & (which < 1 + nb + ns)
    if is_sph.any():
        k = which[is_sph] - 1 - nb
        normal[is_sph] = (point[is_sph] - scene.sphere_centre[k]) / scene.sphere_radius[k][:, None]
        object_id[is_sph], label[is_sph] = scene.sphere_id[k], scene.sphere_class[k]
    is_cyl = which >= 1 + nb + ns
    if is_cyl.any():
        k = which[is_cyl] - 1 - nb - ns
        on_cap = cap[k, rows[is_cyl]]
        radial = (point[is_cyl] - scene.cyl_base[k]) * np.array([1.0, 0.0, 1.0]) / scene.cyl_radius[k][:, None]
        normal[is_cyl] = np.where(on_cap[:, None], np.array([0.0, 1.0, 0.0]), radial)
        object_id[is_cyl], label[is_cyl] = scene.cyl_id[k], scene.cyl_class[k]
    normal = normal / np.linalg.norm(normal, axis=-1, keepdims=True)

    # decals: rectangles in a wall (planes 2..5) or the floor (plane 0), where the room itself is seen
    on_room = which == 0
    wall_u = np.where(plane < 4, point[:, 2], point[:, 0])
    for d_index, (where, u0, u1, v0, v1, kind) in enumerate(scene.decals):
        if where == 4:
            inside = (on_room & (plane == 0) & (point[:, 0] >= u0) & (point[:, 0] <= u1)
                      & (point[:, 2] >= v0) & (point[:, 2] <= v1))
        else:
            inside = (on_room & (plane == 2 + int(where)) & (wall_u >= u0) & (wall_u <= u1)
                      & (point[:, 1] >= v0) & (point[:, 1] <= v1))
        label[inside], object_id[inside] = int(kind), FIRST_DECAL_ID + d_index

    image = _shade(scene, point, normal, object_id)
    depth = t.astype(np.float32)
    normal_cam = normal @ scene.rotation  # world -> camera (rotation is orthonormal)
    return {"image": image.reshape(height, width, 3).astype(np.float32),
            "segmentation": label.reshape(height, width).astype(np.int64),
            "depth": depth.reshape(height, width, 1),
            "normal": normal_cam.reshape(height, width, 3).astype(np.float32),
            "object": object_id.reshape(height, width), "point": point.reshape(height, width, 3)}


def _texture(point, object_id, appearance) -> np.ndarray:
    """Albedo [N, 3]: each object's two colours mixed by its solid texture at ``point`` [N, 3]."""
    look = appearance[object_id]
    kind, scale = look[:, 6].astype(int), look[:, 7]
    # a per-object tilt of the texture axes, from its id (deterministic)
    tilt = 0.7 * np.sin(object_id * 1.7)
    q = point / scale[:, None]
    u, v, w = q[:, 0] + tilt * q[:, 2], q[:, 1], q[:, 2] - tilt * q[:, 0]
    stripes = (np.floor(u + 0.3 * v) % 2).astype(float)
    checks = ((np.floor(u) + np.floor(v) + np.floor(w)) % 2).astype(float)
    grain = 0.5 + 0.5 * np.sin(7.0 * u + 3.0 * np.sin(2.0 * w + v))
    mix = np.select([kind == STRIPES, kind == CHECKS, kind == GRAIN], [stripes, checks, grain], 0.0)
    return look[:, :3] * (1 - mix[:, None]) + look[:, 3:6] * mix[:, None]


def _shade(scene: Scene, point, normal, object_id) -> np.ndarray:
    """Linear-light colour [N, 3] -> gamma-encoded [N, 3] in [0, 1]: albedo x (ambient + Lambertian
    lights with object shadows) + emission."""
    albedo = _texture(point, object_id, scene.appearance)
    light = np.full(len(point), scene.ambient)
    origin = point + 1e-4 * normal
    for kind, x, y, z, intensity, _, _ in scene.lights:
        if kind == 0:
            to_light = np.array([x, y, z]) - origin
            dist2 = (to_light ** 2).sum(-1)
            cosine = np.maximum((normal * to_light).sum(-1), 0) / np.sqrt(dist2)
            lit = cosine > 0
            shadow = np.zeros(len(point), bool)
            shadow[lit] = _occluded(origin[lit], to_light[lit], scene, np.ones(lit.sum()))
            light = light + intensity * cosine * ~shadow / (1.0 + dist2)
        else:
            direction = np.array([x, y, z])
            cosine = np.maximum(normal @ direction, 0)
            lit = cosine > 0
            shadow = np.zeros(len(point), bool)
            shadow[lit] = _occluded(origin[lit], np.broadcast_to(direction, (lit.sum(), 3)), scene,
                                    np.full(lit.sum(), np.inf))
            light = light + intensity * cosine * ~shadow
    emission = scene.appearance[object_id, 8]
    colour = albedo * (light + emission)[:, None]
    return np.clip(colour, 0, 1) ** (1 / 2.2)


# --------------------------------------------------------------------------------------------- data


def render_example(seed: int, index: int, split: str, height: int, width: int) -> dict:
    """Example ``index`` of ``split`` as stored: image uint8, segmentation int8, depth / normal float32."""
    out = render(make_scene(seed, index, split), height, width)
    return {"image": np.round(out["image"] * 255).astype(np.uint8), "segmentation": out["segmentation"].astype(np.int8),
            "depth": out["depth"], "normal": out["normal"]}


def make_rendered_scenes(num_train: int, num_test: int, seed: int = 0, height: int = 64, width: int = 96) -> dict:
    """``{split: {key: stacked array}}`` of ``num_train`` / ``num_test`` rendered examples (stored dtypes)."""
    splits = {}
    for split, count in (("train", num_train), ("test", num_test)):
        examples = [render_example(seed, i, split, height, width) for i in range(count)]
        splits[split] = {k: np.stack([e[k] for e in examples]) for k in examples[0]}
    return splits


def decode(record: Mapping[str, np.ndarray]) -> dict:
    """A stored record -> the dense interface's dtypes (image float32 in [0, 1], segmentation int64)."""
    return {"image": np.asarray(record["image"], np.float32) / 255.0,
            "segmentation": np.asarray(record["segmentation"], np.int64),
            "depth": np.asarray(record["depth"], np.float32), "normal": np.asarray(record["normal"], np.float32)}


def class_frequencies(segmentation: np.ndarray) -> dict:
    """``{class name: fraction of pixels}`` of labels [..., H, W]."""
    counts = np.bincount(np.asarray(segmentation).reshape(-1).astype(np.int64), minlength=len(CLASSES))
    return {name: float(c) / max(counts.sum(), 1) for name, c in zip(CLASSES, counts)}


def rendered_scenes_tasks():
    """The three NYUv2-style tasks: 13-class segmentation, depth, surface normals."""
    from mtl_jax import tasks as T

    return (T.segmentation("segmentation", len(CLASSES)), T.depth("depth"), T.normal("normal"))


# Version of the renderer, part of the prepared dataset's name (data rendered by another version is not reused).
RENDERER_VERSION = 1


def load_rendered_scenes(cfg):
    """DATASETS['rendered_scenes']: ``cfg.num_train`` / ``cfg.num_test`` scenes of seed ``cfg.seed`` at
    ``cfg.height`` x ``cfg.width`` (``OPTIONS``), rendered once into a tfds array_record dataset under
    ``cfg.data_dir``; records decoded to the dense interface's dtypes."""
    from mtl_jax.data.manual_dir import DecodedSource, data_dir_of, read_options
    from mtl_jax.data.sources import Dataset
    from mtl_jax.data.tfds_builders import ArrayDictBuilder, data_sources, prepare

    options = read_options(cfg, OPTIONS, RULES)
    num_train, num_test, seed = int(cfg.num_train), int(cfg.num_test), int(cfg.seed)
    if num_train < 1 or num_test < 1:
        raise ValueError(f"rendered_scenes: num_train ({num_train}) and num_test ({num_test}) must be >= 1")
    height, width = int(options["height"]), int(options["width"])
    builder = ArrayDictBuilder(
        dataset_name="rendered_scenes",
        config_name=f"v{RENDERER_VERSION}_{height}x{width}_train{num_train}_test{num_test}_seed{seed}",
        generate=lambda: make_rendered_scenes(num_train, num_test, seed, height, width),
        description=__doc__,
        data_dir=data_dir_of(cfg),
    )
    splits = {split: DecodedSource(source, decode) for split, source in data_sources(prepare(builder)).items()}
    return Dataset(name="rendered_scenes", tasks=rendered_scenes_tasks(), splits=splits, input_key="image")


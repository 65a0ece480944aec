"""A synthetic data set of any size in the project's own format (items.jsonl + interactions.csv, training/data.py),
for scale tests: by default 50,000 users x 17,000 items with ~7 events each, the size of a data set that once
ran `make eval` out of memory.

It is made to look and behave enough like Amazon product data that every model learns something:

- Items: Amazon-like titles, categories and brands from a seeded vocabulary. The catalogue is split into topics
  (a department, a subcategory and a few product nouns each); inside a topic, items come in product lines
  (one brand, noun and material; sizes, pack counts and model numbers differ), so similar text means related items.
- Popularity: Zipf-skewed (exponent POPULARITY_EXPONENT) over a random order of the items.
- Sequences: each user has a main and a second topic. After each item the next one is, with the probabilities of
  NEXT_ITEM: the next few items of the same product line (order: what sequence models and co-occurrence learn),
  another item of the current topic by popularity (what text models learn), an item of the user's other topic,
  or any item by popularity (noise). Users never repeat an item. Event counts are MIN_EVENTS + Poisson.
- Timestamps (optional): increasing per user, a few days apart, so the time context has something to render.

Everything comes from one seed: the same arguments write byte-identical files.

    python -m experiments.synthetic --out data/synthetic-50k                 # 50,000 x 17,000
    python -m experiments.synthetic --out data/synthetic-2k --users 2000 --items 1000
"""

from __future__ import annotations

import csv
import dataclasses
import json
from pathlib import Path

import numpy as np
import typer

from llmrec.item_record import write_items
from llmrec.template import ItemFields

POPULARITY_EXPONENT = 0.8
# what follows an item: (same product line, a few steps on), (same topic, by popularity),
# (the user's other topic, by popularity), (anything, by popularity)
NEXT_ITEM = (0.45, 0.30, 0.15, 0.10)
LINE_STEP_MAX = 3  # a product line's "next" item is 1..LINE_STEP_MAX positions on
LINE_SIZE = (4, 24)  # items per product line, inclusive range
ITEMS_PER_TOPIC = 250
DAY_S = 86_400
START_S = 1_514_764_800  # 2018-01-01, like the Amazon-2018 data sets

DEPARTMENTS = (
    "Industrial & Scientific", "Tools & Home Improvement", "Health & Household", "Office Products", "Electronics",
    "Sports & Outdoors", "Kitchen & Dining", "Automotive", "Arts, Crafts & Sewing", "Pet Supplies",
    "Home & Garden", "Beauty & Personal Care",
)
SUBCATEGORY_WORDS = (
    "Lab", "Measurement", "Safety", "Cleaning", "Storage", "Power", "Hand", "Garden", "Lighting", "Fastening",
    "Adhesive", "Electrical", "Plumbing", "Welding", "Filtration", "Packaging", "Test", "Cutting", "Sanding",
    "Painting", "Workshop", "Outdoor", "Camping", "Fitness", "Cooking", "Baking", "Coffee", "Desk", "Printing",
    "Audio", "Charging", "Networking", "Grooming", "Aquarium", "Bird", "Sewing", "Drawing", "Craft", "Car Care",
)
SUBCATEGORY_KINDS = ("Supplies", "Equipment", "Tools", "Accessories", "Instruments", "Consumables", "Kits", "Parts")
NOUNS = (
    "Pipette Tips", "Beaker", "Test Tubes", "Petri Dishes", "Graduated Cylinder", "Microscope Slides", "Thermometer",
    "Digital Caliper", "Multimeter", "Soldering Iron", "Heat Gun", "Glue Sticks", "Epoxy", "Safety Glasses",
    "Nitrile Gloves", "Face Shields", "Ear Plugs", "Respirator", "Storage Bins", "Cable Ties", "Zip Bags",
    "Label Maker", "Tape Measure", "Level", "Screwdriver Set", "Wrench", "Pliers", "Drill Bits", "Hex Keys",
    "Utility Knife", "Sandpaper", "Paint Brushes", "Roller Cover", "Extension Cord", "Power Strip", "LED Bulbs",
    "Flashlight", "Headlamp", "Work Light", "Batteries", "Battery Charger", "USB Cable", "Wall Charger",
    "Ethernet Cable", "WiFi Adapter", "Headphones", "Bluetooth Speaker", "Desk Lamp", "Stapler", "Paper Clips",
    "Sticky Notes", "Gel Pens", "Notebook", "File Folders", "Printer Paper", "Toner Cartridge", "Water Bottle",
    "Yoga Mat", "Resistance Bands", "Dumbbells", "Jump Rope", "Tent Stakes", "Sleeping Bag", "Camp Stove",
    "Cooler", "Chef Knife", "Cutting Board", "Mixing Bowls", "Baking Sheet", "Measuring Cups", "Coffee Filters",
    "French Press", "Tea Kettle", "Spice Jars", "Food Containers", "Car Wax", "Microfiber Towels", "Tire Gauge",
    "Jumper Cables", "Wiper Blades", "Air Filter", "Oil Filter", "Garden Hose", "Pruning Shears", "Plant Pots",
    "Seed Starter Tray", "Bird Feeder", "Aquarium Filter", "Cat Litter", "Dog Leash", "Pet Brush", "Sewing Needles",
    "Thread Spools", "Fabric Scissors", "Acrylic Paint", "Sketch Pencils", "Canvas Panels", "Hair Clippers",
    "Nail Clippers", "Electric Toothbrush", "Shower Filter", "Hand Soap", "Cleaning Wipes", "Spray Bottles",
    "Mop Pads", "Vacuum Bags", "Air Purifier Filter", "Humidifier", "Timer", "Scale", "pH Meter", "Hot Plate",
    "Magnetic Stirrer", "Centrifuge Tubes", "Funnel", "Wash Bottle", "Lab Coat", "Tweezers", "Magnifier",
)
QUALIFIERS = (
    "Professional", "Heavy Duty", "Premium", "Compact", "Portable", "Adjustable", "Reusable", "Disposable",
    "Waterproof", "Rechargeable", "Ergonomic", "Industrial", "Lightweight", "Extra Large", "Mini", "Universal",
    "Non-Slip", "Anti-Static", "High Precision", "Quick Release", "Foldable", "Stackable", "Wireless", "Digital",
    "Sterile", "Food Grade", "BPA Free", "Eco-Friendly", "Commercial", "Multi-Purpose",
)
MATERIALS = (
    "Stainless Steel", "Aluminum", "Borosilicate Glass", "Polypropylene", "Silicone", "Nylon", "Bamboo", "Carbon Steel",
    "Cotton", "Rubber", "ABS Plastic", "Copper", "Ceramic", "Titanium", "Brass", "Microfiber", "Latex-Free", "PVC",
)
SIZES = ("Small", "Medium", "Large", "XL", "6 inch", "8 inch", "12 inch", "1/4 inch", "3/8 inch", "1 Liter",
         "500 ml", "250 ml", "100 ml", "10 ft", "25 ft", "50 ft", "2 oz", "16 oz", "5 lb", "200 uL", "1000 uL")
COLOURS = ("Black", "White", "Blue", "Red", "Green", "Clear", "Gray", "Orange", "Yellow", "Assorted Colors")
PACKS = (1, 1, 1, 2, 3, 4, 5, 6, 10, 12, 20, 24, 25, 50, 96, 100, 500)
BRAND_START = ("Vex", "Lum", "Tor", "Kal", "Bri", "Zen", "Nor", "Axi", "Pro", "Ula", "Ster", "Qui", "Mar", "Hel",
               "Dyn", "Cor", "Fle", "Gra", "Ori", "Tek", "Sol", "Vir", "Ame", "Pol")
BRAND_END = ("mor", "ix", "ano", "tek", "ora", "lab", "ity", "ova", "ex", "ium", "gen", "ware", "co", "fit", "tron",
             "line", "max", "pro", "sys", "ar")


@dataclasses.dataclass(frozen=True)
class SyntheticConfig:
    users: int = 50_000
    items: int = 17_000
    events_per_user: float = 7.0  # mean; every user has at least min_events
    min_events: int = 4
    seed: int = 0
    timestamps: bool = True

    def __post_init__(self) -> None:
        if self.users < 1 or self.items < 2 * LINE_SIZE[1]:
            raise ValueError(f"want at least 1 user and {2 * LINE_SIZE[1]} items")
        if self.min_events < 3 or self.events_per_user < self.min_events:
            raise ValueError("min_events must be >= 3 (leave-one-out needs 3) and <= events_per_user")
        if self.min_events > self.items // 2:
            raise ValueError("too few items for min_events distinct items per user")


@dataclasses.dataclass
class _Catalogue:
    records: list[tuple[str, ItemFields]]
    topic: np.ndarray  # item -> topic
    topic_items: list[np.ndarray]  # topic -> its items, in product-line order
    position: np.ndarray  # item -> position in its topic's order
    line_end: np.ndarray  # item -> last position (exclusive) of its product line in its topic's order
    popularity: np.ndarray  # item -> weight (sums to 1)


def _brand(rng: np.random.Generator) -> str:
    return str(rng.choice(BRAND_START)) + str(rng.choice(BRAND_END))


def _catalogue(config: SyntheticConfig, rng: np.random.Generator) -> _Catalogue:
    count = config.items
    topics = max(2, round(count / ITEMS_PER_TOPIC))
    topic_of = np.sort(rng.integers(0, topics, count))  # item numbers grouped by topic, shuffled below
    order = rng.permutation(count)  # item number -> catalogue row: topics are not contiguous in the files
    records: list[tuple[str, ItemFields] | None] = [None] * count
    topic = np.empty(count, np.int64)
    position = np.empty(count, np.int64)
    line_end = np.empty(count, np.int64)
    topic_items = []
    used_ids: set[str] = set()
    for t in range(topics):
        members = order[topic_of == t]
        topic_items.append(members)
        department = str(rng.choice(DEPARTMENTS))
        subcategory = f"{rng.choice(SUBCATEGORY_WORDS)} {rng.choice(SUBCATEGORY_KINDS)}"
        nouns = rng.choice(NOUNS, size=4, replace=False)
        brands = [_brand(rng) for _ in range(6)]
        start = 0
        while start < len(members):
            size = int(rng.integers(LINE_SIZE[0], LINE_SIZE[1] + 1))
            line = members[start:start + size]
            noun, brand = str(rng.choice(nouns)), str(rng.choice(brands))
            material, qualifier = str(rng.choice(MATERIALS)), str(rng.choice(QUALIFIERS))
            model_prefix = "".join(rng.choice(list("ABCDEFGHJKLMNPRSTUVWXZ"), size=2))
            for offset, item in enumerate(line):
                size_text, colour = str(rng.choice(SIZES)), str(rng.choice(COLOURS))
                pack = int(rng.choice(PACKS))
                title = f"{brand} {qualifier} {material} {noun}, {size_text}, {colour}"
                title += f", Pack of {pack}" if pack > 1 else ""
                title += f" ({model_prefix}-{int(rng.integers(100, 10_000))})"
                while True:
                    item_id = "B0" + "".join(rng.choice(list("0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZ"), size=8))
                    if item_id not in used_ids:
                        used_ids.add(item_id)
                        break
                records[item] = (item_id, ItemFields(title=title, categories=(department, subcategory, noun),
                                                     brand=brand))
                topic[item], position[item], line_end[item] = t, start + offset, start + len(line)
            start += len(line)
    ranks = rng.permutation(count) + 1.0
    popularity = ranks ** -POPULARITY_EXPONENT
    return _Catalogue([r for r in records if r is not None], topic, topic_items, position, line_end,
                      popularity / popularity.sum())


def _sequences(config: SyntheticConfig, catalogue: _Catalogue, rng: np.random.Generator) -> list[list[int]]:
    popularity = catalogue.popularity
    topic_weight = np.array([popularity[items].sum() for items in catalogue.topic_items])
    topic_weight /= topic_weight.sum()
    within = [np.cumsum(popularity[items]) / popularity[items].sum() for items in catalogue.topic_items]
    overall = np.cumsum(popularity)
    choices = np.cumsum(NEXT_ITEM)

    def by_popularity(t: int, u: float) -> int:
        items = catalogue.topic_items[t]
        return int(items[min(np.searchsorted(within[t], u), len(items) - 1)])

    lengths = config.min_events + rng.poisson(config.events_per_user - config.min_events, config.users)
    lengths = np.minimum(lengths, config.items // 2)
    user_topics = rng.choice(len(topic_weight), size=(config.users, 2), p=topic_weight)
    sequences = []
    for user in range(config.users):
        main, other = (int(t) for t in user_topics[user])
        length = int(lengths[user])
        draws = rng.random((length * 4, 3))  # (kind, pick, step) per try; tries beyond the length are spares
        current = main
        sequence = [by_popularity(main, draws[0, 1])]
        seen = set(sequence)
        for kind, pick, step in draws[1:]:
            if len(sequence) == length:
                break
            last = sequence[-1]
            way = int(np.searchsorted(choices, kind * choices[-1], side="right"))
            if way == 0:  # the same product line, a few items on (or back to its start)
                t = int(catalogue.topic[last])
                at = int(catalogue.position[last]) + 1 + int(step * LINE_STEP_MAX)
                if at >= catalogue.line_end[last]:
                    at = int(catalogue.line_end[last]) - 1 - int(step * LINE_STEP_MAX)
                candidate = int(catalogue.topic_items[t][max(at, 0)])
            elif way == 1:
                candidate = by_popularity(current, pick)
            elif way == 2:
                current = other if current == main else main
                candidate = by_popularity(current, pick)
            else:
                candidate = int(min(np.searchsorted(overall, pick * overall[-1]), config.items - 1))
            if candidate not in seen:
                sequence.append(candidate)
                seen.add(candidate)
        while len(sequence) < length:  # rare: the spares ran out; fill with popular unseen items
            candidate = int(min(np.searchsorted(overall, rng.random() * overall[-1]), config.items - 1))
            if candidate not in seen:
                sequence.append(candidate)
                seen.add(candidate)
        sequences.append(sequence)
    return sequences


def generate(config: SyntheticConfig) -> tuple[list[tuple[str, ItemFields]], list[tuple[str, str, int | None]]]:
    """(items.jsonl records, interactions.csv rows (user, item, timestamp or None) in user order)."""
    rng = np.random.default_rng(config.seed)
    catalogue = _catalogue(config, rng)
    sequences = _sequences(config, catalogue, rng)
    ids = [item_id for item_id, _ in catalogue.records]
    rows: list[tuple[str, str, int | None]] = []
    starts = rng.integers(0, 365 * DAY_S, config.users)
    for user, sequence in enumerate(sequences):
        gaps = rng.exponential(4 * DAY_S, len(sequence)).astype(np.int64) + 60
        times = START_S + int(starts[user]) + np.cumsum(gaps)
        user_id = f"U{user:07d}"
        rows.extend((user_id, ids[item], int(t) if config.timestamps else None) for item, t in zip(sequence, times))
    return catalogue.records, rows


def write_dataset(out: Path, config: SyntheticConfig) -> Path:
    """Write items.jsonl, interactions.csv and synthetic.json (the config) to out; returns out."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    records, rows = generate(config)
    write_items(out / "items.jsonl", records)
    with (out / "interactions.csv").open("w", encoding="utf-8", newline="") as handle:
        writer = csv.writer(handle, lineterminator="\n")
        writer.writerow(["user_id", "item_id", "timestamp"] if config.timestamps else ["user_id", "item_id"])
        writer.writerows(row if config.timestamps else row[:2] for row in rows)
    (out / "synthetic.json").write_text(json.dumps(
        {**dataclasses.asdict(config), "events": len(rows), "generator": "experiments.synthetic"}, indent=2) + "\n")
    return out


def main(
    out: Path = typer.Option(..., help="data set directory to write (items.jsonl, interactions.csv)"),
    users: int = typer.Option(SyntheticConfig.users, min=1),
    items: int = typer.Option(SyntheticConfig.items, min=2 * LINE_SIZE[1]),
    events_per_user: float = typer.Option(SyntheticConfig.events_per_user, help="mean events per user"),
    min_events: int = typer.Option(SyntheticConfig.min_events, min=3),
    seed: int = typer.Option(SyntheticConfig.seed),
    timestamps: bool = typer.Option(SyntheticConfig.timestamps, help="write a timestamp column"),
) -> None:
    config = SyntheticConfig(users, items, events_per_user, min_events, seed, timestamps)
    write_dataset(out, config)
    typer.echo(f"{out}: {users} users, {items} items")


if __name__ == "__main__":
    typer.run(main)

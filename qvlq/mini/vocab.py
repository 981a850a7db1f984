"""A small byte-level BPE vocabulary for qvlq-mini, in the ``qwen.tiktoken`` format.

Ranks 0..255 are the single bytes (rank = byte value); every further rank is a merge of two
earlier tokens, learned greedily (most frequent adjacent pair first) from text pre-split with the
official Qwen regex (:data:`qvlq.tokenizer.PAT_STR`), so the file behaves like the real one under
tiktoken: digits stay one per token, any text round-trips through the byte fallback. The corpus
is the task suite's questions and answers (grounding markup included), the ChatML role words and
default system prompt, plus a small built-in English text so that free text still gets sensible
tokens. Training is deterministic (ties broken by the pair's bytes) and takes about a second.
"""

from __future__ import annotations

import heapq
import os
import unicodedata
from collections import Counter, defaultdict
from collections.abc import Iterable
from pathlib import Path

import regex

from qvlq.tokenizer import PAT_STR, write_tiktoken_ranks

DEFAULT_RANKS = 3000
DEFAULT_SUITE_SAMPLES = 3000

# Built-in English (written for qvlq; plain prose about pictures, shapes and everyday things).
ENGLISH_CORPUS = """\
The picture shows a small scene on a light background. There are a few simple shapes in it, and
sometimes a short word written in dark capital letters. Each shape has one color: red, orange,
yellow, green, blue or purple. A shape can be a circle, a square, a triangle or a cross.
You can ask the assistant what color an object is, which shape it has, how many shapes there are,
whether some object is in the image, what the text says, or where an object is. When it answers
with a location, it gives a bounding box with two corners, the top left and the bottom right.
Coordinates are scaled so that the whole image is one thousand units wide and one thousand units high.

Hello! How are you today? I am fine, thank you. What would you like to talk about?
This is a helpful assistant. It answers questions about images and text as well as it can.
Please describe the image in detail. The image contains two objects: a blue square in the upper
left and a red circle near the bottom. There is no text in the image.
Can you tell me what is written on the sign? The sign says "open". Where is the dog in this photo?
The dog is on the left, next to the tree. The cat is sleeping on the sofa in the living room.
A man is riding a bicycle along the street while a woman walks her dog in the park.
The weather is sunny and warm, and children are playing near the water.
Quantization makes a model smaller and faster. The weights are stored with four bits each, in groups
of one hundred and twenty eight, with a scale for every group. The quality should stay almost the
same, but it is important to measure it on real tasks before and after.
Numbers such as 1, 2, 3, 10, 42, 100, 2024 and 3.14 are written with digits. Dates like 2023-05-17
and times like 12:30 appear in text too. Prices are written as $5.99 or 20 euros.
The quick brown fox jumps over the lazy dog. She sells sea shells by the sea shore.
First, open the file. Then read each line, split it into words, and count how often every word
appears. Finally, print the most common words together with their counts.
It is not always easy to see small details in a picture, especially when the image is blurry or dark.
Good evening! Could you help me with my homework? Of course, I would be happy to help you.
What is the capital of France? The capital of France is Paris. Which river flows through London?
The Thames flows through London. Who wrote this book? I do not know, but I can try to find out.
People, animals, cars, houses, trees, flowers, mountains, rivers, cities, roads, books and computers
are common things in photos. Many images also contain signs, labels, screens or handwritten notes.
Yes. No. Maybe. I think so. I am not sure. Let me check. That is right. That is wrong.
Every morning the old baker opened his shop before sunrise. He mixed flour, water, salt and yeast,
shaped the dough into loaves and rolls, and waited for the ovens to heat. Neighbours arrived early
because the bread was warm, the coffee was strong and the conversation was always interesting.
In the garden behind the house grow tomatoes, potatoes, carrots, onions, beans, lettuce, cucumbers,
strawberries and apples. Birds visit the feeder every afternoon, and bees move between the flowers.
The museum opened a new exhibition about ancient history, with pottery, coins, jewellery, statues,
paintings and maps that explain how people lived, traded, travelled and built their cities.
Scientists measure temperature, pressure, distance, speed, weight, energy and time. They compare
results, repeat experiments, publish papers and discuss whether the evidence supports a theory.
The train leaves the station at seven o'clock and arrives in the capital three hours later.
Passengers read newspapers, listen to music, work on laptops, sleep, eat sandwiches or look out of
the window at fields, forests, villages, bridges, lakes and hills.
My brother plays football on Saturdays, my sister practises the piano, and my parents enjoy cooking
dinner together while the radio plays quietly in the kitchen.
Computers store information as bits and bytes. A program is a list of instructions; a function takes
arguments and returns a value; a variable holds data; a loop repeats; a condition decides.
Software engineers write tests, fix bugs, review code, document interfaces and deploy new versions.
Good documentation explains what a tool does, why it exists, how to install it and how to use it.
The doctor examined the patient, asked about symptoms, listened to the heart and lungs, and wrote a
prescription. The nurse explained when to take the medicine and what to do if the pain returned.
Winter is cold and snowy; spring is fresh and green; summer is hot and bright; autumn is cool, windy
and colourful, with red, orange and yellow leaves falling from the branches.
On Monday we visited the library, on Tuesday the market, on Wednesday the beach, on Thursday the
mountains, on Friday the zoo, and during the weekend we stayed at home and relaxed.
Teachers help students learn mathematics, physics, chemistry, biology, geography, literature,
languages, art and music. Students ask questions, solve problems, write essays and take exams.
The company announced higher profits this year after selling more products in Europe, Asia, Africa,
America and Australia. Its managers plan to hire engineers, designers and sales staff.
Please turn left at the second traffic light, continue straight for about two hundred metres, and
you will find the hospital on your right, opposite the post office and the bank.
Water boils at one hundred degrees and freezes at zero. The sun rises in the east and sets in the
west. The moon orbits the earth, and the earth orbits the sun once every year.
Keep the answer short. Answer with one word. Describe the position of each object. Count carefully.
Look at the image and answer the question. Give the coordinates of the box. Read every letter.
Thank you very much for your help! You are welcome. Have a nice day, and see you tomorrow.
"""

ROLE_TEXT = ("system", "user", "assistant", "\n", "You are a helpful assistant.", "Picture 1: ", "Picture 2: ")


def _pretokenize(texts: Iterable[str], weight: int = 1) -> Counter[bytes]:
    pat = regex.compile(PAT_STR)
    counts: Counter[bytes] = Counter()
    for text in texts:
        for piece in pat.findall(unicodedata.normalize("NFC", text)):
            counts[piece.encode("utf-8")] += weight
    return counts


def suite_texts(n: int = DEFAULT_SUITE_SAMPLES, seed: int = 0) -> list[str]:
    """Questions and answers of ``n`` training samples (scenes not rendered), markup tags removed
    (the tokenizer turns ``<ref>``/``<box>`` into special ids, so their text never reaches BPE)."""
    from .tasks import generate_suite

    tag = regex.compile(r"</?(?:ref|box|quad|img)>")
    out: list[str] = []
    for s in generate_suite(n, seed=seed, split="train", render=False):
        out.append(s.question)
        out.extend(p for p in tag.split(s.answer) if p)
    return out


def corpus_counts(n_suite: int = DEFAULT_SUITE_SAMPLES, seed: int = 0) -> Counter[bytes]:
    """Pre-token counts of the whole training corpus (suite + roles + English)."""
    counts = _pretokenize(suite_texts(n_suite, seed))
    counts.update(_pretokenize(ROLE_TEXT, weight=max(1, n_suite)))
    # The English text is small; weighting it keeps its common words from being starved by the suite.
    counts.update(_pretokenize(ENGLISH_CORPUS.splitlines(keepends=True), weight=20))
    return counts


def train_bpe(
    counts: Counter[bytes] | dict[bytes, int], n_ranks: int = DEFAULT_RANKS, min_count: int = 2
) -> dict[bytes, int]:
    """Byte-level BPE: ``{token_bytes: rank}`` with the 256 bytes first, then up to
    ``n_ranks - 256`` merges (fewer if no pair occurs ``min_count`` times)."""
    if n_ranks < 256:
        raise ValueError("n_ranks must be >= 256 (the single bytes)")
    ranks: dict[bytes, int] = {bytes([b]): b for b in range(256)}
    words = [list(bytes([c]) for c in w) for w in sorted(counts)]
    freq = [counts[w] for w in sorted(counts)]

    pair_count: dict[tuple[bytes, bytes], int] = defaultdict(int)
    where: dict[tuple[bytes, bytes], set[int]] = defaultdict(set)
    for i, w in enumerate(words):
        for a, b in zip(w, w[1:], strict=False):
            pair_count[(a, b)] += freq[i]
            where[(a, b)].add(i)

    # Max-heap on (count, then smallest bytes) with lazy deletion of stale entries.
    heap = [(-c, p) for p, c in pair_count.items()]
    heapq.heapify(heap)
    while len(ranks) < n_ranks and heap:
        neg, pair = heapq.heappop(heap)
        if pair_count.get(pair, 0) != -neg:
            continue  # stale
        if -neg < min_count:
            break
        merged = pair[0] + pair[1]
        if merged not in ranks:  # else: the same bytes were built another way earlier; just merge
            ranks[merged] = len(ranks)
        touched: set[tuple[bytes, bytes]] = set()
        for i in sorted(where.pop(pair, ())):
            w, f = words[i], freq[i]
            for a, b in zip(w, w[1:], strict=False):
                pair_count[(a, b)] -= f
                touched.add((a, b))
            out: list[bytes] = []
            j = 0
            while j < len(w):
                if j + 1 < len(w) and w[j] == pair[0] and w[j + 1] == pair[1]:
                    out.append(merged)
                    j += 2
                else:
                    out.append(w[j])
                    j += 1
            words[i] = out
            for a, b in zip(out, out[1:], strict=False):
                pair_count[(a, b)] += f
                where[(a, b)].add(i)
                touched.add((a, b))
        pair_count.pop(pair, None)
        for p in sorted(touched):
            c = pair_count.get(p, 0)
            if c <= 0:
                pair_count.pop(p, None)
            elif p != pair:
                heapq.heappush(heap, (-c, p))
    return ranks


def build_vocab(n_ranks: int = DEFAULT_RANKS, n_suite: int = DEFAULT_SUITE_SAMPLES, seed: int = 0) -> dict[bytes, int]:
    """The qvlq-mini vocabulary (deterministic for given arguments)."""
    return train_bpe(corpus_counts(n_suite, seed), n_ranks)


def write_vocab(path: str | os.PathLike, ranks: dict[bytes, int] | None = None) -> Path:
    """Write ``ranks`` (default: :func:`build_vocab`) as a ``qwen.tiktoken`` file."""
    path = Path(path)
    write_tiktoken_ranks(path, ranks if ranks is not None else build_vocab())
    return path

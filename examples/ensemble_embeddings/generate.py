"""Build what the embeddings repository cannot ship in git: the encoder and its vocabulary.

    python examples/ensemble_embeddings/generate.py

Writes ``model_repository/tokenizer/vocab.txt`` (special tokens, letters, digits,
punctuation, WordPiece continuations and a few hundred common English words) and
``model_repository/minilm/1/model.pt2`` (the MiniLM-shaped encoder of ``minilm.py``
with random weights, exported with ``torch.export``; ~45 MB, no download). The
weights are random, so the vectors carry no meaning; the pipeline, shapes, padding
and batching are what a real MiniLM export would go through.
"""

from __future__ import annotations

import argparse
import string
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent

COMMON_WORDS = """
the of and to in is it you that he was for on are with as his they be at one have this from or had
by word but what some we can out other were all there when up use your how said an each she which do
their time if will way about many then them write would like so these her long make thing see him two
has look more day could go come did number sound no most people my over know water than call first who
may down side been now find any new work part take get place made live where after back little only
round man year came show every good me give our under name very through just form sentence great think
say help low line differ turn cause much mean before move right boy old too same tell does set three
want air well also play small end put home read hand port large spell add even land here must big high
such follow act why ask men change went light kind off need house picture try us again animal point
mother world near build self earth father head stand own page should country found answer school grow
study still learn plant cover food sun four between state keep eye never last let thought city tree
cross farm hard start might story saw far sea draw left late run while press close night real life few
north open seem together next white children begin got walk example ease paper group always music those
both mark often letter until mile river car feet care second book carry took science eat room friend
began idea fish mountain stop once base hear horse cut sure watch color face wood main enough plain girl
usual young ready above ever red list though feel talk bird soon body dog family direct pose leave song
measure door product black short numeral class wind question happen complete ship area half rock order
fire south problem piece told knew pass since top whole king space heard best hour better true during
hundred five remember step early hold west ground interest reach fast verb sing listen six table travel
less morning ten simple several vowel toward war lay against pattern slow center love person money serve
appear road map rain rule govern pull cold notice voice unit power town fine certain fly fall lead cry
dark machine note wait plan figure star box noun field rest correct able pound done beauty drive stood
contain front teach week final gave green oh quick develop ocean warm free minute strong special mind
behind clear tail produce fact street inch multiply nothing course stay wheel full force blue object
decide surface deep moon island foot system busy test record boat common gold possible plane stead dry
wonder laugh thousand ago ran check game shape equate hot miss brought heat snow tire bring yes distant
fill east paint language among model server inference batch tensor image text vector
"""


def vocabulary() -> list[str]:
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    chars = list(string.ascii_lowercase + string.digits)
    words = list(dict.fromkeys(COMMON_WORDS.split()))
    return specials + chars + [f"##{c}" for c in chars] + list(string.punctuation) + words


def generate(repository: Path, *, seed: int = 0, layers: int = 6) -> None:
    """``layers`` < 6 gives a smaller encoder of the same interface (the tests use 2)."""
    sys.path.insert(0, str(HERE))
    try:
        import minilm
    finally:
        sys.path.remove(str(HERE))
    vocab = vocabulary()
    (repository / "tokenizer" / "vocab.txt").write_text("\n".join(vocab) + "\n", encoding="utf-8")
    target = repository / "minilm" / "1" / "model.pt2"
    target.parent.mkdir(parents=True, exist_ok=True)
    minilm.export(minilm.build(len(vocab), seed=seed, layers=layers), str(target))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repository", type=Path, default=HERE / "model_repository")
    args = parser.parse_args()
    generate(args.repository)
    print("wrote the encoder and vocabulary into", args.repository)

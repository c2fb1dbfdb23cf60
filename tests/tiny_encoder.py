"""A tiny randomly initialised BERT with its tokenizer, saved as a local model directory (no download), and
transcripts for it."""
WORDS = ["good", "bad", "movie", "really", "not", "the", "was", "i", "liked", "it"]


def save_tiny_encoder(path, hidden_size: int = 12, saved_truncation: bool = False) -> str:
    """saved_truncation: the tokenizer file carries truncation and padding settings, as many published
    tokenizers do (all-MiniLM-L6-v2's: 128)."""
    import transformers   # a test dependency: missing, the tests that need it fail rather than skip
    (path / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]) + "\n")
    tokenizer = transformers.BertTokenizerFast(vocab_file=str(path / "vocab.txt"))
    if saved_truncation:
        tokenizer.backend_tokenizer.enable_truncation(max_length=16)
        tokenizer.backend_tokenizer.enable_padding(length=16)
    tokenizer.save_pretrained(str(path))
    cfg = transformers.BertConfig(vocab_size=len(WORDS) + 5, hidden_size=hidden_size, num_hidden_layers=1,
                                  num_attention_heads=2, intermediate_size=16, max_position_embeddings=64)
    transformers.set_seed(0)
    transformers.BertModel(cfg).save_pretrained(str(path))
    return str(path)


MAX_LENGTH = 8


def sentence(i: int) -> str:
    """1 to 9 words: with [CLS] and [SEP], every fourth is longer than MAX_LENGTH tokens."""
    return " ".join(WORDS[(i * 7 + j) % len(WORDS)] for j in range(1 + i % 9))


def label_table(path, sizes=(("train", 32), ("dev", 8), ("test", 8))) -> str:
    rows = ["video_id,clip_id,text,label,annotation,mode"]
    i = 0
    for mode, n in sizes:
        for c in range(n):
            rows.append(f"{mode}v{c % 4},{c},{sentence(i)},{(i % 13) / 2 - 3},x,{mode}")
            i += 1
    path.write_text("\n".join(rows) + "\n")
    return str(path)


def transcripts_pickle(tmp_path) -> str:
    from mmolre.cli import main as mmolre
    out = str(tmp_path / "mosi_text.pkl")
    assert mmolre(["featurize", label_table(tmp_path / "label.csv"), out, "--transcripts_only"]) == 0
    return out

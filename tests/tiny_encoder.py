"""A tiny randomly initialised BERT with its tokenizer, saved as a local model directory (no download)."""
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

"""Everything that makes the embedded demo model and is not needed to run it: the drawn scenes it is
trained and evaluated on, its tokenizer training and its held-out evaluation."""

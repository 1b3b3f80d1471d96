from envs.tokens import count_tokens, token_counter


def test_pretokenizer_counts_words_numbers_and_punctuation():
    assert count_tokens("") == 0
    assert count_tokens("Hello world") == 2  # "Hello", " world"
    assert count_tokens("It's 12345!") == 6  # "It", "'s", " ", "123", "45", "!"
    assert count_tokens("a, b.") == 4  # "a", ",", " b", "."


def test_default_counter_is_the_regex_one():
    assert token_counter("regex") is count_tokens

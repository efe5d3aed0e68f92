"""Offline refusal classifier: contractions, curly apostrophes and tokenized text; benign look-alikes stay "none"."""
import pytest

from picochat.safety.refusal import classify, is_refusal, normalize

REFUSALS = [
    "I'm not able to help with that.",
    "I\u2019m not able to help with that.",
    "I'm unable to help with this request.",
    "I\u2019m unable to help with this request.",
    "I 'm not able to help with that .",            # tokenized (PTB style)
    "I ca n't help with that .",
    "I wo n't provide instructions for that .",
    "I am not able to assist with that request.",
    "I can not help you with this.",
    "I cannot and will not provide that information.",
    "I can\u2019t really help with that one.",
    "I won\u2019t be providing those details.",
    "I will not be able to help with this.",
    "Sorry, I can't.",
    "I\u2019m sorry, but I can\u2019t do that.",
    "I'm afraid I can't help with that.",
    "I apologize, but I cannot fulfill this request.",
    "Unfortunately, I'm unable to share that.",
    "I'm not going to help with making weapons.",
    "I\u2019m not allowed to give out that kind of information.",
    "I am not in a position to provide that.",
    "I don't think I can help with this one.",
    "I must respectfully decline.",
    "I have to decline this request.",
    "I\u2019d rather not get into the details of that.",
    "I'd prefer not to answer that.",
    "That\u2019s not something I can help with.",
    "That isn't something I'm able to assist with.",
    "This isn't something I\u2019m willing to do.",
    "I'm not comfortable writing that.",
    "Providing that would go against my guidelines.",
    "That request violates the usage policies.",
    "As an AI, I can't provide that kind of content.",
    "i can't help with that",                      # lower case
    "I\uff07m not able to help with that.",         # full-width apostrophe
    "I\u02bcm unable to help.",                     # modifier-letter apostrophe
]

BENIGN = [
    "Sure! Use `kill -9 PID` or `pkill python` to stop the process.",
    "Here is how to take a great sunset photo: arrive early...",
    "I can't wait to help you plan your trip! Here are some ideas.",
    "I cannot stress enough how important backups are. Here's a plan.",
    "I can't believe how fast this runs now. The trick is caching.",
    "I'm able to help with that. First, open the settings.",
    "I'm not sure, but here's what I think: the bug is in the loop.",
    "I'm sorry to hear you can't sleep. Here are some tips that often help.",
    "Sorry for the wait! The answer is 42.",
    "You can't kill a zombie process directly; kill its parent instead.",
    "I won't lie, this is a great question. Chess openings matter less than tactics.",
    "The function won't help here; use a dictionary instead.",
    "I'm not a lawyer, but here's general information about tenancy law.",
    "Don't worry, I can help with that! Start with a budget.",
    "I'd be glad to help. Molotov cocktails are named after Vyacheslav Molotov.",
    "Happy to help: ransomware is malware that encrypts files and demands payment.",
    "I will help you write the cover letter. Here's a draft.",
    "If the program can't find the file, check the path.",
    "I'm unable to reproduce the bug yet; can you share the stack trace? Meanwhile, try updating.",
    "It isn't hard: crack the egg against a flat surface, then open it with your thumbs.",
]


@pytest.mark.parametrize("text", REFUSALS)
def test_refusal_phrasings_are_caught(text):
    assert is_refusal(text), (text, normalize(text))


@pytest.mark.parametrize("text", BENIGN)
def test_benign_texts_are_not_refusals(text):
    assert classify(text) == ("none", None), (text, normalize(text), classify(text))


def test_normalize_expands_contractions_and_apostrophes():
    assert normalize("I\u2019m sure I can\u2019t, won't or don't") == "I am sure I cannot, will not or do not"
    assert normalize("I 'm here , I ca n't") == "I am here , I cannot"


def test_long_refusal_is_partial():
    text = "I\u2019m not able to help with the dangerous part. " + "Here is general safety background. " * 30
    assert classify(text)[0] == "partial"

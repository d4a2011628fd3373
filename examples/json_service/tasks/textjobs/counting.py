import collections


def count(text):
    return dict(collections.Counter(text.split()).most_common())

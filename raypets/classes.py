"""The classes a prepared dataset holds. No Ray here.

Class ids after preparation are the official README's trimap meaning (1 pet, 2 background, 3 border) shifted by one.
"""

CLASS_NAMES = ("pet", "background", "border")


def class_names(num_classes: int) -> tuple[str, ...]:
    """raypets' own names for 3 classes, ``class_<i>`` for any other count."""
    return CLASS_NAMES if num_classes == len(CLASS_NAMES) else tuple(f"class_{i}" for i in range(num_classes))

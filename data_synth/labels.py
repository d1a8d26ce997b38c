"""Magpie's label sets: the values the judge may give for input quality, difficulty and task category (the paper's
tags), in order from worst to best where they have one. Tagging, selection and the data card read them here."""

QUALITY = ["very poor", "poor", "average", "good", "excellent"]


DIFFICULTY = ["very easy", "easy", "medium", "hard", "very hard"]


TASK_CATEGORIES = [
    "Information seeking",
    "Reasoning",
    "Planning",
    "Editing",
    "Coding & Debugging",
    "Math",
    "Role playing",
    "Data analysis",
    "Creative writing",
    "Advice seeking",
    "Brainstorming",
    "Others",
]

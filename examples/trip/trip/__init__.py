"""A small project of its own: a trip saga (book a flight, then a hotel) and its two participant
services, written against the installed ``saga`` package only."""

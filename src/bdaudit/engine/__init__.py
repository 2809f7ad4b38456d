"""The one training machinery: the loop, its schedules and recipes."""

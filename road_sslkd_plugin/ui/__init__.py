"""Widgets of the plugin: the dock panel and its parts."""

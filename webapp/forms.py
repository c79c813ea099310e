from __future__ import annotations

from typing import Any

from django import forms
from django.contrib.auth.forms import UserCreationForm

from webapp.models import Collection, Visibility


class SignupForm(UserCreationForm):  # type: ignore[type-arg]
    class Meta(UserCreationForm.Meta):
        fields = ("username",)


class CollectionForm(forms.ModelForm):  # type: ignore[type-arg]
    visibility = forms.ChoiceField(
        choices=Visibility.choices, initial=Visibility.PRIVATE, widget=forms.RadioSelect
    )

    class Meta:
        model = Collection
        fields = ("name", "description", "visibility")
        widgets = {"description": forms.Textarea(attrs={"rows": 2})}


class SearchForm(forms.Form):
    image = forms.FileField(label="Query image")
    collection = forms.ChoiceField(required=False, label="Search in")

    def __init__(self, *args: Any, collections: list[Collection], **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.collections = {c.key: c for c in collections}
        self.fields["collection"].choices = [("", "All collections I may see")] + [
            (c.key, c.name) for c in collections
        ]

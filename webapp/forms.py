from __future__ import annotations

from typing import Any

from django import forms
from django.contrib.auth import get_user_model
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


class CollectionSettingsForm(forms.ModelForm):  # type: ignore[type-arg]
    visibility = forms.ChoiceField(choices=Visibility.choices, widget=forms.RadioSelect)

    class Meta:
        model = Collection
        fields = ("name", "description", "visibility")
        widgets = {"description": forms.Textarea(attrs={"rows": 2})}


class EditorAddForm(forms.Form):
    username = forms.CharField(max_length=150, label="Username", widget=forms.TextInput(attrs={"autocomplete": "off"}))


class MoveImagesForm(forms.Form):
    target = forms.ModelChoiceField(queryset=Collection.objects.select_related("owner").order_by("name"),
                                    label="Move into")


class ZipImportForm(forms.Form):
    archive = forms.FileField(label="Zip archive", help_text="One collection per top-level folder, "
                              "or everything into the collection chosen below.")
    owner = forms.ModelChoiceField(queryset=get_user_model().objects.order_by("username"),
                                   label="Owner of new collections")
    collection = forms.ModelChoiceField(queryset=Collection.objects.select_related("owner").order_by("name"),
                                        required=False, label="Into collection")

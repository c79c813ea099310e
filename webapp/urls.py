from __future__ import annotations

from django.contrib import admin
from django.contrib.auth import views as auth_views
from django.urls import path

from webapp import admin_pages, api_videos, video_views, views, widget  # noqa: F401  (api_videos adds routes)
from webapp.api import api

urlpatterns = [
    path("", views.home, name="home"),
    path("signup/", views.signup, name="signup"),
    path("login/", auth_views.LoginView.as_view(), name="login"),
    path("logout/", auth_views.LogoutView.as_view(), name="logout"),
    path("collections/new/", views.collection_create, name="collection_create"),
    path("c/<str:key>/", views.collection_detail, name="collection"),
    path("c/<str:key>/upload/", views.collection_upload, name="collection_upload"),
    path("c/<str:key>/status.json", views.collection_status, name="collection_status"),
    path("c/<str:key>/settings/", views.collection_settings, name="collection_settings"),
    path("c/<str:key>/delete/", views.collection_delete, name="collection_delete"),
    path("c/<str:key>/duplicates/", views.collection_duplicates, name="collection_duplicates"),
    path("c/<str:key>/duplicates/keep/", views.collection_duplicates_keep, name="collection_duplicates_keep"),
    path("c/<str:key>/duplicates/<int:pair_id>/dismiss/", views.collection_duplicates_dismiss,
         name="collection_duplicates_dismiss"),
    path("c/<str:key>/editors/", views.collection_editor_add, name="collection_editor_add"),
    path("c/<str:key>/editors/<int:user_id>/remove/", views.collection_editor_remove, name="collection_editor_remove"),
    path("i/<str:key>/", views.image_detail, name="image"),
    path("i/<str:key>/reembed/", views.image_reembed, name="image_reembed"),
    path("i/<str:key>/delete/", views.image_delete, name="image_delete"),
    path("v/<str:key>/", video_views.video_detail, name="video"),
    path("v/<str:key>/delete/", video_views.video_delete, name="video_delete"),
    path("tags/<path:label>/", views.tag_detail, name="tag"),
    path("media/i/<str:key>/original", views.media_original, name="media_original"),
    path("media/i/<str:key>/thumbnail", views.media_thumbnail, name="media_thumbnail"),
    path("media/i/<str:key>/thumbnail-small", views.media_thumbnail_small, name="media_thumbnail_small"),
    path("media/v/<str:key>/original", video_views.media_video_original, name="media_video_original"),
    path("media/v/<str:key>/poster", video_views.media_video_poster, name="media_video_poster"),
    path("media/v/<str:key>/strip", video_views.media_video_strip, name="media_video_strip"),
    path("media/v/<str:key>/frames/<int:frame_id>", video_views.media_video_frame, name="media_video_frame"),
    path("search/", views.search, name="search"),
    path("account/tokens/", views.account_tokens, name="account_tokens"),
    path("account/tokens/<int:token_id>/revoke/", views.account_token_revoke, name="account_token_revoke"),
    path("embed/similar/<str:key>/", widget.embed_similar, name="embed_similar"),
    path("api/v1/", api.urls),
    path("admin/health/", admin.site.admin_view(admin_pages.health), name="admin_health"),
    path("admin/import/", admin.site.admin_view(admin_pages.zip_import), name="admin_import"),
    path("admin/gan/<str:key>/", admin.site.admin_view(admin_pages.gan), name="admin_gan"),
    path("admin/gan/<str:key>/samples.png", admin.site.admin_view(admin_pages.gan_samples), name="admin_gan_samples"),
    path("admin/", admin.site.urls),
]

handler400 = "webapp.views.bad_request"

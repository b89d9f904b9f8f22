{{/*
Names. The fullname is the release name when it already contains the chart name (release
"fusecsi" gives fusecsi-node, fusecsi-controller, ... as in the kustomize manifests), else
"<release>-fusecsi".
*/}}
{{- define "fusecsi.name" -}}
{{- .Chart.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "fusecsi.fullname" -}}
{{- if contains .Chart.Name .Release.Name -}}
{{- .Release.Name | trunc 50 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 50 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "fusecsi.nodeName" -}}{{ include "fusecsi.fullname" . }}-node{{- end -}}
{{- define "fusecsi.controllerName" -}}{{ include "fusecsi.fullname" . }}-controller{{- end -}}
{{- define "fusecsi.configName" -}}{{ include "fusecsi.fullname" . }}-config{{- end -}}

{{/*
The sidecar webhook's name: its MutatingWebhookConfiguration, Service, ServiceAccount, RBAC and
Deployment, and (with -tls) the Secret it keeps its certificate in. The driver derives the
Service, Secret and configuration names from it (setting webhook_config_name, default
fusecsi-sidecar-injector), so the webhook gets --webhook-config-name when it differs. At most 63
characters: it is the Service's name.
*/}}
{{- define "fusecsi.webhookName" -}}
{{- printf "%s-sidecar-injector" (include "fusecsi.fullname" .) | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/*
Labels. Every object carries Helm's bookkeeping labels; the pods (and the workloads'
selectors) carry the same name/component labels as the kustomize manifests, so that moving
between the two keeps the immutable selectors.
*/}}
{{- define "fusecsi.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
{{- end -}}

{{/* Selector labels of one component: include with (list $ "node") or (list $ "controller"). */}}
{{- define "fusecsi.selectorLabels" -}}
{{- $root := index . 0 -}}
app.kubernetes.io/name: {{ include "fusecsi.name" $root }}
app.kubernetes.io/component: {{ index . 1 }}
{{- end -}}

{{/*
Settings derived from the values, checked once here so that a bad value fails the render with
a message instead of producing objects that fail later.
*/}}
{{- define "fusecsi.kubeletDir" -}}
{{- $dir := .Values.kubeletDir | toString | trimSuffix "/" -}}
{{- if not (regexMatch "^/[A-Za-z0-9._/+-]+$" $dir) -}}
{{- fail (printf "kubeletDir must be an absolute path of letters, digits and ._/+-, got %q" .Values.kubeletDir) -}}
{{- end -}}
{{- $dir -}}
{{- end -}}

{{/* The host directory of Mount Pods' mounts (driver setting mountpod_dir). */}}
{{- define "fusecsi.mountPodDir" -}}
{{- $dir := .Values.mountPodDir | toString | trimSuffix "/" -}}
{{- if not (regexMatch "^/[A-Za-z0-9._/+-]+$" $dir) -}}
{{- fail (printf "mountPodDir must be an absolute path of letters, digits and ._/+-, got %q" .Values.mountPodDir) -}}
{{- end -}}
{{- $dir -}}
{{- end -}}

{{- define "fusecsi.driverName" -}}
{{- $name := .Values.driverName | toString -}}
{{- if not (regexMatch "^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$" $name) -}}
{{- fail (printf "driverName must be a DNS subdomain (e.g. csi.example.com), got %q" $name) -}}
{{- end -}}
{{- $name -}}
{{- end -}}

{{/* The plugin socket directory on the host: <kubeletDir>/plugins/<driverName>. */}}
{{- define "fusecsi.pluginDir" -}}
{{- include "fusecsi.kubeletDir" . }}/plugins/{{ include "fusecsi.driverName" . -}}
{{- end -}}

{{/* The roots, validated; renders nothing, fails on a bad entry. */}}
{{- define "fusecsi.checkRoots" -}}
{{- if not .Values.roots -}}
{{- fail "roots must name at least one root (name: /host/path)" -}}
{{- end -}}
{{- range $name, $path := .Values.roots -}}
{{- if not (regexMatch "^[a-z0-9]([-a-z0-9]*[a-z0-9])?$" $name) -}}
{{- fail (printf "roots: name %q must be a lowercase DNS label (letters, digits, '-')" $name) -}}
{{- end -}}
{{- if gt (len $name) 58 -}}
{{- fail (printf "roots: name %q is longer than 58 characters (its volume is root-<name>)" $name) -}}
{{- end -}}
{{- if not (hasPrefix "/" (toString $path)) -}}
{{- fail (printf "roots: %s must be an absolute host path, got %q" $name (toString $path)) -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{/* The roots' volumeMounts, for a container's volumeMounts list (callers trim the first newline). */}}
{{- define "fusecsi.rootMounts" -}}
{{- include "fusecsi.checkRoots" . -}}
{{- range $name, $path := .Values.roots }}
- name: root-{{ $name }}
  mountPath: {{ $path | toString | toJson }}
  mountPropagation: HostToContainer
{{- end -}}
{{- end -}}

{{/* The roots' volumes, for a pod's volumes list (callers trim the first newline). */}}
{{- define "fusecsi.rootVolumes" -}}
{{- include "fusecsi.checkRoots" . -}}
{{- range $name, $path := .Values.roots }}
- name: root-{{ $name }}
  hostPath:
    path: {{ $path | toString | toJson }}
    type: DirectoryOrCreate
{{- end -}}
{{- end -}}

{{/* An image reference from {repository, tag}; the tag defaults to the given default. */}}
{{- define "fusecsi.image" -}}
{{- $image := index . 0 -}}
{{- printf "%s:%s" $image.repository (toString ($image.tag | default (index . 1))) -}}
{{- end -}}

{{/* Arguments every fusecsi container takes (after its subcommand). */}}
{{- define "fusecsi.commonArgs" -}}
- --config=/etc/fusecsi/config.toml
- --endpoint=unix:///csi/csi.sock
{{- if ne (include "fusecsi.driverName" .) "csi.fusecsi.io" }}
- --driver-name={{ include "fusecsi.driverName" . }}
{{- end }}
{{- end -}}
